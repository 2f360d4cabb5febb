"""Moderator: moderates images against text policies with CLIP, over gRPC."""
