"""Loading real data sets into tensors."""
