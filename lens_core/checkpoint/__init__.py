"""Reading model files: the safetensors reader, filling a model from a checkpoint, and telling what a file holds."""
