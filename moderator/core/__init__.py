"""What every path shares: policies, the CLIP model, embeddings, images, scoring, outcomes."""
