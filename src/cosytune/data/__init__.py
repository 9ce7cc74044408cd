"""Dataset preparation stages, records and the training-time data pipeline."""
