"""What the data side and the model side share: the errors the entry point reports and the
batch convention. Both sides import this package; it imports neither."""
