"""The ops, one module each, forward and backward side by side, each declaring what it keeps for its backward."""
