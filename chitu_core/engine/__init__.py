"""The inference engine: sequences, paged KV blocks, continuous-batching scheduler, runner."""
