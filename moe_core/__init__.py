"""Pieces both services share: the model config, checkpoint reading and writing, the tensor wire codec."""
