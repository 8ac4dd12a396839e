"""Model architectures; each computes only through the bound ``Ops`` and torch math."""
