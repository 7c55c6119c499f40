"""The LaViLa-style narrator: model, tokenizers, generation, training batches."""
