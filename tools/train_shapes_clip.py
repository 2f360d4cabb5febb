"""Train the bundled demo CLIP ("moderator-shapes-demo") on synthetic coloured shapes.

    python tools/train_shapes_clip.py               # train, evaluate, save the fp16 checkpoint
    python tools/train_shapes_clip.py --calibrate   # score policies/demo with the saved model

Deterministic on CPU for a given --seed and --threads: the weights are initialised after
`torch.manual_seed(seed)` and every image comes from `random.Random` with a fixed seed. Images go
through exactly the service's preprocessing (letterbox with `fit_to_square`, `to_chw_array`,
then CLIP mean/std), generated once up front. Captions use several English templates, among them
the three the demo policies use. Many captions in a batch name the same colour and shape, so
the contrastive loss spreads its target uniformly over every same-class pair instead of the
diagonal alone.

The run ends with zero-shot accuracy on held-out images (best of the 24 captions
"a {colour} {shape}"); it exits 1 below --min-accuracy. `--calibrate` prints, for every policy
in policies/demo, its score ranges on held-out positives and negatives and a suggested
threshold, and checks the default `render_shape` image of every colour and shape against the
thresholds in the files.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from moderator.config import (
    DEMO_CONFIG_PATH,
    DEMO_DIR,
    DEMO_MODEL_NAME,
    DEMO_POLICIES_DIR,
    ModelConfig,
)
from moderator.core.clip import ClipModel, load_clip
from moderator.core.embeddings import EmbeddingCache, build_policy_index
from moderator.core.policies import Policy, PolicySet, load_policy_dir
from moderator.core.scoring import score_views
from moderator.core.views import Preprocessing, fit_to_square, to_chw_array
from moderator.demo.shapes import COLOURS, SHAPES, random_shape_image, render_shape

CLASSES: list[tuple[str, str]] = [(colour, shape) for colour in COLOURS for shape in SHAPES]
# {phrase} is "a red circle" / "an orange star". The first three are the policy templates.
CAPTION_TEMPLATES = (
    "{phrase}",
    "a photo of {phrase}.",
    "a picture of {phrase}.",
    "{colour} {shape}",
    "a {shape} that is {colour}",
    "an image of {phrase}",
    "a drawing of {phrase}.",
    "{phrase} on a plain background",
)
# Independent random streams per purpose, so the evaluation images are never training images.
TRAIN_STREAM, EVAL_STREAM, CALIBRATION_STREAM = 0, 1, 2
CALIBRATION_IMAGES = 2400


@dataclass(frozen=True)
class Dataset:
    pixels: torch.Tensor  # uint8 [N, 3, S, S], exactly what the service feeds the model
    labels: torch.Tensor  # int64 [N], index into CLASSES


@dataclass(frozen=True)
class Accuracy:
    overall: float
    by_colour: dict[str, float]
    by_shape: dict[str, float]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=DEMO_DIR, help="where the .pt goes")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-images", type=int, default=16000)
    parser.add_argument("--eval-images", type=int, default=1200)
    parser.add_argument("--min-accuracy", type=float, default=0.90)
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="do not train: score the policies in --policies-dir with the saved checkpoint",
    )
    parser.add_argument("--policies-dir", type=Path, default=DEMO_POLICIES_DIR)
    return parser.parse_args(argv)


def with_article(words: str) -> str:
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def class_phrase(colour: str, shape: str) -> str:
    return with_article(f"{colour} {shape}")


def caption(template: str, colour: str, shape: str) -> str:
    return template.format(phrase=class_phrase(colour, shape), colour=colour, shape=shape)


def preprocessing(image_size: int) -> Preprocessing:
    """The service's letterbox parameters: pad with the CLIP mean colour."""
    red, green, blue = (round(255 * m) for m in OPENAI_DATASET_MEAN)
    return Preprocessing(image_size, (red, green, blue))


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def make_dataset(seed: int, count: int, prep: Preprocessing) -> Dataset:
    rng = random.Random(seed)
    index = {label: i for i, label in enumerate(CLASSES)}
    pixels = torch.empty(count, 3, prep.size, prep.size, dtype=torch.uint8)
    labels = torch.empty(count, dtype=torch.int64)
    for i in range(count):
        image, colour, shape = random_shape_image(rng)
        pixels[i] = torch.from_numpy(to_chw_array(fit_to_square(image, prep)))
        labels[i] = index[(colour, shape)]
    return Dataset(pixels, labels)


def load_model(config_path: Path, checkpoint: Path | None = None) -> Any:
    open_clip.add_model_config(config_path)
    pretrained = str(checkpoint) if checkpoint is not None else None
    return open_clip.create_model(DEMO_MODEL_NAME, pretrained=pretrained)


def image_size_of(config_path: Path) -> int:
    open_clip.add_model_config(config_path)
    size = open_clip.get_model_config(DEMO_MODEL_NAME)["vision_cfg"]["image_size"]
    return int(size)


def tokenize_captions(tokenizer: Any) -> torch.Tensor:
    """Tokens of every caption, indexed [class, template, position]."""
    texts = [caption(t, c, s) for c, s in CLASSES for t in CAPTION_TEMPLATES]
    tokens: torch.Tensor = tokenizer(texts)
    return tokens.view(len(CLASSES), len(CAPTION_TEMPLATES), -1)


def label_aware_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, with the target spread over all same-class pairs."""
    logits = logit_scale.exp() * image_features @ text_features.T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)  # symmetric matrix, so rows work both ways
    image_to_text = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    text_to_image = -(targets * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2 and p.numel() < 1_000_000]
    keep = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in keep]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to zero."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def train(model: Any, data: Dataset, captions: torch.Tensor, args: argparse.Namespace) -> None:
    optimizer = make_optimizer(model, args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    max_logit_scale = math.log(100)
    model.train()
    started = time.monotonic()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        batch = torch.randint(len(data.labels), (args.batch_size,), generator=generator)
        labels = data.labels[batch]
        templates = torch.randint(len(CAPTION_TEMPLATES), (args.batch_size,), generator=generator)
        pixels = data.pixels[batch]
        flip = torch.rand(args.batch_size, generator=generator) < 0.5
        pixels[flip] = pixels[flip].flip(-1)
        image_features = model.encode_image(normalise(pixels), normalize=True)
        text_features = model.encode_text(captions[labels, templates], normalize=True)
        loss = label_aware_clip_loss(image_features, text_features, labels, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_logit_scale)
        if step % 50 == 0 or step == args.steps - 1:
            elapsed = time.monotonic() - started
            print(f"step {step:4d}  loss {loss.item():.4f}  {elapsed:6.1f} s", flush=True)


@torch.no_grad()
def encode_images(model: Any, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    chunks = [
        model.encode_image(normalise(pixels[i : i + batch_size]), normalize=True)
        for i in range(0, len(pixels), batch_size)
    ]
    return torch.cat(chunks)


@torch.no_grad()
def encode_texts(model: Any, tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    features: torch.Tensor = model.encode_text(tokenizer(list(texts)), normalize=True)
    return features


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, data: Dataset) -> Accuracy:
    """Zero-shot accuracy: the best of the 24 captions "a {colour} {shape}" per image."""
    model.eval()
    classes = encode_texts(model, tokenizer, [class_phrase(c, s) for c, s in CLASSES])
    predicted = (encode_images(model, data.pixels) @ classes.T).argmax(dim=1)
    correct = predicted == data.labels
    colour_of = torch.tensor([list(COLOURS).index(c) for c, _ in CLASSES])
    shape_of = torch.tensor([SHAPES.index(s) for _, s in CLASSES])
    by_colour = {
        name: correct[colour_of[data.labels] == i].float().mean().item()
        for i, name in enumerate(COLOURS)
    }
    by_shape = {
        name: correct[shape_of[data.labels] == i].float().mean().item()
        for i, name in enumerate(SHAPES)
    }
    return Accuracy(correct.float().mean().item(), by_colour, by_shape)


def report_accuracy(title: str, accuracy: Accuracy) -> None:
    print(f"{title}: zero-shot accuracy {accuracy.overall:.4f}")
    print("  by colour: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.by_colour.items()))
    print("  by shape:  " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.by_shape.items()))


def save_checkpoint(model: Any, out_dir: Path) -> tuple[Path, Path]:
    """The fp16 state_dict (plain torch.save), with the model config JSON beside it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / f"{DEMO_MODEL_NAME}.pt"
    config = out_dir / DEMO_CONFIG_PATH.name
    if config.resolve() != DEMO_CONFIG_PATH.resolve():
        shutil.copyfile(DEMO_CONFIG_PATH, config)
    state = {key: value.detach().half() for key, value in model.state_dict().items()}
    torch.save(state, checkpoint)
    return config, checkpoint


def run_training(args: argparse.Namespace) -> int:
    started = time.monotonic()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    prep = preprocessing(image_size_of(DEMO_CONFIG_PATH))
    model = load_model(DEMO_CONFIG_PATH)
    tokenizer = open_clip.get_tokenizer(DEMO_MODEL_NAME)
    params = sum(p.numel() for p in model.parameters())
    print(f"model {DEMO_MODEL_NAME}: {params:,} parameters, input {prep.size} px")

    train_data = make_dataset(args.seed * 10 + TRAIN_STREAM, args.train_images, prep)
    eval_data = make_dataset(args.seed * 10 + EVAL_STREAM, args.eval_images, prep)
    print(
        f"generated {args.train_images} + {args.eval_images} images in "
        f"{time.monotonic() - started:.1f} s"
    )

    train(model, train_data, tokenize_captions(tokenizer), args)
    accuracy = evaluate(model, tokenizer, eval_data)
    report_accuracy(f"held-out ({args.eval_images} images, fp32)", accuracy)

    config, checkpoint = save_checkpoint(model, args.out_dir)
    size = checkpoint.stat().st_size
    print(f"saved {checkpoint} ({size:,} bytes, {size / 2**20:.2f} MiB)")
    reloaded = evaluate(load_model(config, checkpoint).float(), tokenizer, eval_data)
    report_accuracy("reloaded fp16 checkpoint (run in fp32)", reloaded)
    print(f"wall time {time.monotonic() - started:.1f} s")

    worst = min(accuracy.overall, reloaded.overall)
    if worst < args.min_accuracy:
        print(f"FAIL: accuracy {worst:.4f} < {args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


# --- calibration of the demo policies ------------------------------------------------------


def positive_classes(policy: Policy) -> set[int]:
    """The demo classes a policy's descriptions name."""
    phrases = {class_phrase(c, s): i for i, (c, s) in enumerate(CLASSES)}
    unknown = [d for d in policy.descriptions if d not in phrases]
    if unknown:
        raise SystemExit(f"{policy.id}: not a demo class phrase: {unknown}")
    return {phrases[d] for d in policy.descriptions}


def service_scores(clip: ClipModel, policy_set: PolicySet, pixels: torch.Tensor) -> torch.Tensor:
    """Scores [N, P] exactly as the service computes them."""
    index = build_policy_index(
        policy_set, clip.encode_texts, EmbeddingCache(None, "calibration"), clip.device
    )
    scores, _ = score_views(clip.encode_images(pixels), index)
    return scores


def quantile(values: torch.Tensor, q: float) -> float:
    return torch.quantile(values, q).item() if len(values) else float("nan")


def calibrate_policy(policy: Policy, scores: torch.Tensor, labels: torch.Tensor) -> None:
    positives = positive_classes(policy)
    is_positive = torch.tensor([int(label) in positives for label in labels])
    positive, negative = scores[is_positive], scores[~is_positive]
    low, high = quantile(positive, 0.01), quantile(negative, 0.99)
    correct = ((scores >= policy.threshold) == is_positive).float().mean().item()
    print(f"{policy.id}: threshold {policy.threshold}  accuracy {correct:.4f}")
    print(
        f"  positives ({len(positive)}): min {positive.min():.3f}  p1 {low:.3f}  "
        f"median {positive.median():.3f}  max {positive.max():.3f}"
    )
    print(
        f"  negatives ({len(negative)}): min {negative.min():.3f}  median "
        f"{negative.median():.3f}  p99 {high:.3f}  max {negative.max():.3f}"
    )
    print(f"  suggested threshold (midway p1 positives / p99 negatives): {(low + high) / 2:.3f}")


def check_default_images(clip: ClipModel, policy_set: PolicySet) -> bool:
    """Every default render_shape image must be on the right side of every threshold."""
    prep = clip.preprocessing
    pixels = torch.stack(
        [
            torch.from_numpy(to_chw_array(fit_to_square(render_shape(c, s), prep)))
            for c, s in CLASSES
        ]
    )
    all_scores = service_scores(clip, policy_set, pixels)
    all_ok = True
    for column, policy in enumerate(policy_set.policies):
        scores = all_scores[:, column]
        positives = positive_classes(policy)
        margins = [
            (score - policy.threshold) * (1 if i in positives else -1)
            for i, score in enumerate(scores.tolist())
        ]
        worst = min(range(len(CLASSES)), key=lambda i: margins[i])
        ok = margins[worst] > 0
        all_ok = all_ok and ok
        print(
            f"{policy.id}: default render_shape images {'OK' if ok else 'WRONG'}; smallest "
            f"margin {margins[worst]:+.3f} ({class_phrase(*CLASSES[worst])}, score "
            f"{scores[worst]:.3f}); median margin {statistics.median(margins):+.3f}"
        )
    return all_ok


def run_calibration(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    clip = load_clip(
        ModelConfig(
            name=DEMO_MODEL_NAME,
            pretrained=str(args.out_dir / f"{DEMO_MODEL_NAME}.pt"),
            device="cpu",
            precision="fp32",
            config_path=args.out_dir / DEMO_CONFIG_PATH.name,
        )
    )
    policy_set = load_policy_dir(args.policies_dir)
    data = make_dataset(args.seed * 10 + CALIBRATION_STREAM, CALIBRATION_IMAGES, clip.preprocessing)
    scores = service_scores(clip, policy_set, data.pixels)
    print(f"{len(policy_set.policies)} policies, {CALIBRATION_IMAGES} held-out random images")
    for column, policy in enumerate(policy_set.policies):
        calibrate_policy(policy, scores[:, column], data.labels)
    return 0 if check_default_images(clip, policy_set) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_calibration(args) if args.calibrate else run_training(args)


if __name__ == "__main__":
    sys.exit(main())
