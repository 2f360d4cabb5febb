"""The obvious way to write this service, as a baseline for bench/throughput.py.

A synchronous grpc server; each image is fully decoded and preprocessed with open_clip's own
transform (which centre-crops), then run through the model alone; scores are a loop over
policies. Same model, weights and precision as the service it is compared with.

    python bench/naive_server.py --port 50052 --precision bf16
"""

from __future__ import annotations

import argparse
import io
import logging
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import open_clip
import torch
from moderator_client.v1 import moderator_pb2 as pb
from moderator_client.v1 import moderator_pb2_grpc as pb_grpc
from PIL import Image

from moderator.core.clip import PRECISIONS
from moderator.core.policies import load_policy_dir


class NaiveServicer(pb_grpc.ModeratorServicer):
    def __init__(self, model: Any, preprocess: Any, dtype: torch.dtype, policies: Any) -> None:
        self.model = model
        self.preprocess = preprocess
        self.dtype = dtype
        self.policies = policies.policies
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
        with torch.inference_mode():
            self.text = [
                torch.nn.functional.normalize(
                    model.encode_text(tokenizer(list(p.descriptions))).float(), dim=-1
                )
                for p in self.policies
            ]

    def Moderate(  # noqa: N802
        self, request: pb.ModerateRequest, context: grpc.ServicerContext
    ) -> pb.ModerateResponse:
        results = []
        for image in request.images:
            picture = Image.open(io.BytesIO(image.data)).convert("RGB")
            pixels = self.preprocess(picture).unsqueeze(0).to(self.dtype)
            with torch.inference_mode():
                embedding = self.model.encode_image(pixels).float()
            embedding = torch.nn.functional.normalize(embedding, dim=-1)[0]
            policy_results = []
            for policy, text in zip(self.policies, self.text, strict=True):
                score = float((text @ embedding).max())
                policy_results.append(
                    pb.PolicyResult(
                        policy_id=policy.id, score=score, violated=score >= policy.threshold
                    )
                )
            results.append(
                pb.ImageResult(id=image.id, decision=pb.DECISION_ALLOW, policies=policy_results)
            )
        return pb.ModerateResponse(results=results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=50052)
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS))
    parser.add_argument("--policies", default="policies")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-B-32", pretrained=None, precision=args.precision
    )
    model.eval()
    dtype = PRECISIONS[args.precision]
    servicer = NaiveServicer(model, preprocess, dtype, load_policy_dir(Path(args.policies)))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)],
    )
    pb_grpc.add_ModeratorServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"SERVING on port {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
