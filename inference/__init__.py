"""predict.py's machinery: a trained model from a checkpoint, the video index and search, the results page."""
