"""Client of the Moderator gRPC service: grpcio and protobuf, no torch.

from moderator_client import ModeratorClient

with ModeratorClient("localhost:50051") as client:
    result = client.moderate(["upload.jpg"])
    print(result.results[0].decision)
"""

from moderator_client.client import (
    AsyncModeratorClient,
    ImageLike,
    ModeratorClient,
    service_config,
)
from moderator_client.results import (
    ImageError,
    ImageResult,
    ModerateResult,
    PolicyResult,
    RequestError,
    format_json,
)

__all__ = [
    "AsyncModeratorClient",
    "ImageError",
    "ImageLike",
    "ImageResult",
    "ModerateResult",
    "ModeratorClient",
    "PolicyResult",
    "RequestError",
    "format_json",
    "service_config",
]
