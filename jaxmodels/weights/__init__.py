"""Weight import from published checkpoints (Hugging Face layouts) into our parameters."""
