"""Train the shipped model from a seed: ``python -m mmprune.zoo.train --out DIR``.

Three stages, as LLaVA-1.5 is built:

1. ``clip``  — a CLIP vision encoder trained contrastively against generated captions (HF ``CLIPModel`` with a
   small text tower, loss at the [CLS] output). Nothing else teaches the encoder, so [CLS] attention concentrates
   on the objects a caption names and object identity stays in the object's own patches. With
   ``--hard-negatives`` (default) each batch pairs scenes with twins that differ in one shape or colour (as
   NegCLIP), without which the encoder tells captions apart by colours and places and leaves shapes unlearnt.
2. ``align`` — projector alignment: captions ("describe the image .") and QA turns. LLaVA trains only the projector
   here because its LLM is pretrained; ours starts from scratch, so the LLM trains too (a deliberate difference).
3. ``qa``    — end-to-end instruction tuning on several questions per image, each in the
   single-turn chat format the processor writes (``USER: <image>\\n{q} ASSISTANT: {a} </s>``), packed behind one
   shared image prefix with an attention mask that keeps the turns independent (in a plain multi-turn chat, an
   answer about "the red circle" tells a later "is there a red circle ?" the answer without looking).
   Unlike LLaVA-1.5, whose CLIP stays frozen, the vision encoder trains too (``--tune-vision``, at 0.3x the
   learning rate) with its CLIP loss kept on the batch's captions: a 2.7M-parameter CLIP trained for minutes does
   not expose what questions need as well as OpenAI's CLIP does, and the kept contrastive objective keeps [CLS]
   a contrastive summary of the scene. ``--clip-extra`` adds scenes (and their twins) to that contrastive loss
   alone: vision steps for what the encoder learns last, without LLM steps. ``--position-jitter`` gives most
   rows a random layout of image-token position ids (:func:`jittered_layout`), so places are read from features
   and renumbering pre-LLM pruning does not erase them; those layouts keep raster order, from which the LLM
   still reads above/below, and ``--position-shuffle`` puts a share of them out of order so that it must read
   both axes from the features. ``--family-weights`` asks some question families more
   often than the benchmark does (the families a run is weakest at).

An auxiliary per-token loss is optional and stops at qa step ``--aux-until``, after which training goes on
without it; ``--aux-targets row,column`` asks each visual token only where it is, not what covers it. Data are
drawn on the fly from the synthetic generator (training stream of the seed; the benchmark and the dev set use
other streams). A checkpoint is written every ``--save-every`` steps and at each stage's end; ``--resume``
continues from it. The finished model and its processor are saved with ``save_pretrained`` (safetensors) into
``--out``, with ``training.json`` (recipe, wall time, machine) and, when a run was resumed with other settings,
every phase's settings and the step it started at.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    LlavaForConditionalGeneration,
)
from transformers.models.clip.modeling_clip import image_text_contrastive_loss

from mmprune.bench.accuracy import evaluate
from mmprune.data import synthetic
from mmprune.zoo.builder import llava_config, llava_processor

TRAIN_STREAM = 1  # numpy rng stream of training scenes; the benchmark uses stream 0
DEV_SEED = 1  # dev questions: benchmark seed 1 (the reported held-out benchmark is seed 0)


def pixels(images, image_processor) -> torch.Tensor:
    """CLIP normalisation of images already at the model's size (what the processor does to them)."""
    array = np.stack([np.asarray(im, np.float32) / 255.0 for im in images])
    mean = np.array(image_processor.image_mean, np.float32)
    std = np.array(image_processor.image_std, np.float32)
    return torch.from_numpy(((array - mean) / std).transpose(0, 3, 1, 2).copy())


def training_turns(rng, size: int, turns: int, caption_prob: float, weights: list[float] | None = None) -> tuple:
    """A scene and up to ``turns`` distinct (question, answer) pairs about it. Families (of the scene and of each
    question) are drawn uniformly, as in the benchmark, or with probabilities ``weights`` (one per family)."""

    def family() -> str:
        if weights is None:
            return synthetic.FAMILIES[int(rng.integers(len(synthetic.FAMILIES)))]
        return synthetic.FAMILIES[int(rng.choice(len(synthetic.FAMILIES), p=weights))]

    scene = synthetic.scene_for(rng, family(), size)
    qa: dict[str, str] = {}
    if rng.random() < caption_prob:
        qa["describe the image ."] = synthetic.caption(scene)
    for _ in range(3 * turns):
        if len(qa) >= turns:
            break
        asked = synthetic.ask(rng, scene, family())
        if asked is not None:
            qa.setdefault(asked[0], asked[1][0])
    order = list(qa.items())
    rng.shuffle(order)
    return scene, order


def encode_turns(tokenizer, qa: list[tuple[str, str]], image_tokens: int, image_token_id: int,
                 image_positions: list[int] | None = None):
    """Several single-turn chats about one image packed into one row: the shared prefix ``USER: <image>`` once,
    then each ``{q} ASSISTANT: {a} </s>``. Returns (ids, labels, turn, positions): labels supervise answers and
    ``</s>`` only; ``turn`` is 0 on the prefix and ``j + 1`` on turn ``j``; every turn's positions continue from
    the prefix, so with :func:`collate`'s mask (a turn sees the prefix and itself) each turn is exactly the
    single-turn prompt the processor writes (the test suite checks the first) and no answer leaks into another.
    ``image_positions``: the image tokens' position offsets (default ``0..image_tokens-1``, the processor's
    layout; see :func:`jittered_layout`); the text goes on after the largest of them."""
    texts = ["USER:"] + [t for question, answer in qa for t in (f"{question} ASSISTANT:", f"{answer} </s>")]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prefix = encoded[0] + [image_token_id] * image_tokens
    image_positions = list(range(image_tokens)) if image_positions is None else image_positions
    ids, labels = list(prefix), [-100] * len(prefix)
    turn = [0] * len(prefix)
    positions = list(range(len(encoded[0]))) + [len(encoded[0]) + p for p in image_positions]
    text_start = len(encoded[0]) + max(image_positions) + 1
    for j in range(len(qa)):
        prompt, answer = encoded[1 + 2 * j], encoded[2 + 2 * j]
        ids += prompt + answer
        labels += [-100] * len(prompt) + answer
        turn += [j + 1] * (len(prompt) + len(answer))
        positions += range(text_start, text_start + len(prompt) + len(answer))
    return ids, labels, turn, positions


def jittered_layout(rng, image_tokens: int) -> list[int]:
    """Position offsets for the image tokens of one training row, in raster order but spread over a random span
    of ``image_tokens // 9`` to ``1.125 * image_tokens`` positions (sorted draws: gaps where the span is longer
    than the image, shared positions where it is shorter). Without it the LLM reads an object's place from the
    token's position in the sequence rather than from its features, and pre-LLM pruning, which renumbers the kept
    tokens as FasterVLM's and VisionZip's code do, then loses most locations (on a model trained without it, a
    renumbered 33% keep answered location questions at 30% against 80% unpruned; with the original positions, 80%).
    LLaVA-1.5 reads places from CLIP's features: those papers lose little to renumbering."""
    span = int(rng.integers(max(1, image_tokens // 9), image_tokens + image_tokens // 8 + 1))
    return sorted(int(p) for p in rng.choice(span, image_tokens, replace=span < image_tokens))


def collate(rows, pad_id: int):
    """Right-padded ids, labels, position ids and a 4-D boolean attention mask (True: may attend) in which each
    token sees the causal past of the shared prefix and of its own turn; padding sees only itself."""
    width = max(len(row[0]) for row in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id)
    labels = torch.full((batch, width), -100)
    positions = torch.zeros((batch, width), dtype=torch.long)
    turn = torch.full((batch, width), -1)
    for r, (ids, lab, turns, pos) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        labels[r, :len(lab)] = torch.tensor(lab)
        turn[r, :len(turns)] = torch.tensor(turns)
        positions[r, :len(pos)] = torch.tensor(pos)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    key_turn, query_turn = turn[:, None, :], turn[:, :, None]
    visible = (key_turn == 0) | (key_turn == query_turn)
    visible &= (key_turn >= 0) & (query_turn >= 0)
    visible |= torch.eye(width, dtype=torch.bool)  # padding attends to itself (no all-masked rows, no NaN)
    return input_ids, labels, positions, (visible & causal).unsqueeze(1)


def patch_targets(scenes, grid: int) -> torch.Tensor:
    """(B, grid*grid, 5) per-patch labels for the auxiliary loss: colour, shape and size index of the object that
    covers the patch most (0: background), and the patch's row and column."""
    colours, shapes, sizes = list(synthetic.COLOURS), list(synthetic.SHAPES), list(synthetic.SIZES)
    out = torch.zeros(len(scenes), grid * grid, 5, dtype=torch.long)
    out[..., 3] = torch.arange(grid * grid) // grid
    out[..., 4] = torch.arange(grid * grid) % grid
    for b, scene in enumerate(scenes):
        for obj in sorted(scene.objects, key=lambda o: o.box[2] - o.box[0], reverse=True):  # small ones on top
            for i in synthetic.box_patches(obj.box, scene.size, grid):
                out[b, i, :3] = torch.tensor([1 + colours.index(obj.colour), 1 + shapes.index(obj.shape),
                                              1 + sizes.index(obj.size)])
    return out


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build(args):
    processor = llava_processor(synthetic.vocabulary(), args.image_size, args.patch_size)
    vision = CLIPVisionConfig(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                              num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_heads,
                              image_size=args.image_size, patch_size=args.patch_size,
                              projection_dim=args.vision_hidden)
    config = llava_config(processor.tokenizer, vision, hidden_size=args.hidden, intermediate_size=args.intermediate,
                          num_layers=args.layers, num_heads=args.heads)
    return processor, config


def clip_model(processor, config) -> CLIPModel:
    vocab = processor.tokenizer.get_vocab()
    vision = config.vision_config
    text = dict(vocab_size=len(vocab), hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                num_hidden_layers=2, num_attention_heads=vision.num_attention_heads, max_position_embeddings=96,
                pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"])
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict(),
                                projection_dim=vision.projection_dim))


def caption_ids(processor, scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded caption ids ending in </s> (the CLIP text tower pools at the first </s>) and their mask."""
    captions = [synthetic.caption(s) + " </s>" for s in scenes]
    rows = processor.tokenizer(captions, add_special_tokens=False)["input_ids"]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), processor.tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    return ids, mask


def contrastive_loss(clip: CLIPModel, pooled: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``CLIPModel``'s loss from images already encoded (``pooled``: the vision tower's [CLS] output), so the QA
    batch's images go through the shared encoder once for both losses."""
    images = torch.nn.functional.normalize(clip.visual_projection(pooled), dim=-1)
    texts = clip.text_model(input_ids=ids, attention_mask=mask).pooler_output
    texts = torch.nn.functional.normalize(clip.text_projection(texts), dim=-1)
    return image_text_contrastive_loss(texts @ images.T * clip.logit_scale.exp())


def with_twin(rng, scene: synthetic.Scene, hard_negatives: bool) -> list[synthetic.Scene]:
    """``[scene]``, or with ``hard_negatives`` ``[scene, twin]``: both re-rendered from one rng state so the twin
    differs only in the detail :func:`synthetic.hard_negative` changed (a shape, a colour, two colours swapped).
    In one contrastive batch the twin's caption is the hardest negative for the scene, so [CLS] must encode every
    object's shape and colour and which object has which (in-batch negatives alone are told apart by colours and
    places, leaving shapes unlearnt: a linear probe read shapes at near chance from such patches)."""
    if not hard_negatives:
        return [scene]
    seed = int(rng.integers(2**32))
    twin = synthetic.hard_negative(rng, scene)
    out = [synthetic.render(scene.objects, scene.size, scene.cluttered, np.random.default_rng(seed))]
    if twin is not None:
        out.append(synthetic.render(twin, scene.size, scene.cluttered, np.random.default_rng(seed)))
    return out


def clip_batch(rng, processor, size: int, batch: int, hard_negatives: bool):
    """About ``batch`` images and their captions: ``batch`` scenes, or half as many each with its twin."""
    scenes = []
    while len(scenes) < batch:
        scenes += with_twin(rng, synthetic.make_scene(rng, size), hard_negatives)
    ids, mask = caption_ids(processor, scenes)
    return pixels([s.image for s in scenes], processor.image_processor), ids, mask


def source_commit() -> str | None:
    """The git commit of this code (with ``+dirty`` when it has uncommitted changes), or None outside a checkout:
    a phase's settings reproduce its weights only with the code they ran with."""
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here.parent, capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def log(path: Path, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


AUX_TARGETS = ("colour", "shape", "size", "row", "column")  # the columns of patch_targets


def aux_targets_arg(text: str) -> list[str]:
    """``row,column`` -> the per-token labels the auxiliary loss predicts, in patch_targets' column order."""
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in AUX_TARGETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown auxiliary target(s) {', '.join(map(repr, unknown))}; "
                                         f"allowed: {', '.join(AUX_TARGETS)}")
    return [t for t in AUX_TARGETS if t in names]


def family_weights_arg(text: str) -> dict[str, float]:
    """``family=weight,...`` -> {family: weight}; unnamed families weigh 1."""
    weights = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in synthetic.FAMILIES:
            raise argparse.ArgumentTypeError(f"unknown family {name!r}; allowed: {', '.join(synthetic.FAMILIES)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {name!r} must be a number, got {value!r}") from None
        if not weights[name] > 0:
            raise argparse.ArgumentTypeError(f"weight of {name!r} must be > 0, got {value}")
    return weights


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--vision-heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--clip-steps", type=int, default=800)
    p.add_argument("--clip-batch", type=int, default=128)
    p.add_argument("--clip-lr", type=float, default=1e-3)
    p.add_argument("--align-steps", type=int, default=600)
    p.add_argument("--qa-steps", type=int, default=5000)
    p.add_argument("--stop-at", type=int, default=None,
                   help="end the qa stage after this many qa steps; the learning-rate schedule still spans "
                        "--qa-steps (how the shipped weights were taken from a longer schedule)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--tune-vision", action=argparse.BooleanOptionalAction, default=True,
                   help="qa stage: train the vision encoder too, with its CLIP loss kept on")
    p.add_argument("--vision-lr-scale", type=float, default=0.3, help="vision (and CLIP heads) lr / lr")
    p.add_argument("--clip-extra", type=int, default=0,
                   help="qa stage: images (scenes and their twins) added to the contrastive loss only, beyond the "
                        "batch's; they cost a vision step, not an LLM step")
    p.add_argument("--hard-negatives", action=argparse.BooleanOptionalAction, default=True,
                   help="contrastive batches pair each scene with a twin differing in one shape or colour")
    p.add_argument("--clip-weight", type=float, default=0.5, help="weight of the CLIP loss in the qa stage")
    p.add_argument("--aux-until", type=int, default=0,
                   help="qa step before which a per-token auxiliary loss (--aux-targets) is added")
    p.add_argument("--aux-weight", type=float, default=0.3)
    p.add_argument("--aux-targets", type=aux_targets_arg, default=list(AUX_TARGETS),
                   help="what the auxiliary loss reads from each visual token, a subset of "
                        f"{','.join(AUX_TARGETS)} (default: all); row,column alone teach a patch where it is, "
                        "not what covers it")
    p.add_argument("--family-weights", type=family_weights_arg, default=None,
                   help="training share of question families, e.g. exist=2,count=1.5 (others 1; default: uniform, "
                        "as the benchmark)")
    p.add_argument("--position-jitter", type=float, default=0.8,
                   help="share of training rows whose image tokens get a random position layout (jittered_layout)")
    p.add_argument("--position-shuffle", type=float, default=0.0,
                   help="share of the jittered rows whose image-token positions are also put in random order: "
                        "the order of positions then tells nothing of above/below either, so the LLM must read "
                        "both axes from the features (it read rows from the raster order and was weak at left/right)")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--dev", type=int, default=280, help="dev questions per evaluation")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the training forwards: the same computation, 1.5 -> 1.3 s per step on "
                        "the project's 2-core CPU after about a minute of compiling")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast for matmuls (CPU AMX / GPU); weights stay fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    if args.stop_at is not None and not 0 < args.stop_at <= args.qa_steps:
        p.error(f"--stop-at {args.stop_at}: must be a qa step in 1..--qa-steps ({args.qa_steps})")
    for name in ("position_jitter", "position_shuffle"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a share of rows in 0..1")
    family_weights = None
    if args.family_weights:
        raw = [args.family_weights.get(f, 1.0) for f in synthetic.FAMILIES]
        family_weights = [w / sum(raw) for w in raw]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out / "checkpoint.pt", out / "train_log.jsonl"
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    processor, config = build(args)
    model = LlavaForConditionalGeneration(config).to(device)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    clip = clip_model(processor, config).to(device)
    # training forwards only (compiled graphs share the parameters); evaluation, generate and saving stay eager
    train_forward = torch.compile(model) if args.compile else model
    vision_forward = torch.compile(model.model.vision_tower) if args.compile else model.model.vision_tower
    recipe = {k: v for k, v in vars(args).items() if k not in ("out", "resume", "threads", "device", "compile")}
    state = {"stage": "clip", "step": 0, "elapsed": 0.0, "phases": []}
    optimizer_state = aux_state = aux_heads = None
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        clip.load_state_dict(ckpt["clip"])
        state, optimizer_state, aux_state = ckpt["state"], ckpt["optimizer"], ckpt.get("aux")
        print(f"resumed at stage {state['stage']} step {state['step']}")
    phases = state.setdefault("phases", [])
    if not phases or phases[-1]["recipe"] != recipe:
        # a resumed run with other settings: training.json lists every phase, so the weights can be reproduced
        phases.append({"from": f"{state['stage']} step {state['step']}", "recipe": recipe, "commit": source_commit()})
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    dev = synthetic.generate(args.dev, seed=DEV_SEED, size=args.image_size)
    image_tokens = (args.image_size // args.patch_size) ** 2
    started = time.time() - state["elapsed"]

    def save(stage: str, step: int, optimizer) -> None:
        state.update(stage=stage, step=step, elapsed=time.time() - started)
        aux = {"targets": args.aux_targets, "heads": aux_heads.state_dict()} if aux_heads else None
        torch.save({"model": model.state_dict(), "clip": clip.state_dict(), "state": state,
                    "optimizer": optimizer.state_dict(), "aux": aux},
                   ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)

    stages = ["clip", "align", "qa"]
    if stages.index(state["stage"]) == 0:
        params = list(clip.parameters())
        optimizer = torch.optim.AdamW(params, lr=args.clip_lr, weight_decay=0.1)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        clip.train()
        for step in range(state["step"], args.clip_steps):
            rng = np.random.default_rng([args.seed, step, TRAIN_STREAM, 0])
            pix, ids, mask = clip_batch(rng, processor, args.image_size, args.clip_batch, args.hard_negatives)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args.clip_steps, args.clip_lr, 100)
            with autocast:
                result = clip(input_ids=ids.to(device), attention_mask=mask.to(device),
                              pixel_values=pix.to(device), return_loss=True)
            result.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 50 == 0 or step == args.clip_steps - 1:
                hits = (result.logits_per_image.argmax(1) == torch.arange(len(ids), device=device)).float().mean()
                log(log_path, {"stage": "clip", "step": step, "loss": round(result.loss.item(), 4),
                               "retrieval@1": round(hits.item(), 3), "elapsed": round(time.time() - started)})
            if (step + 1) % args.save_every == 0:
                save("clip", step + 1, optimizer)
        model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
        optimizer_state = None
        state.update(stage="align", step=0)

    for stage_name, steps, caption_prob in (("align", args.align_steps, 0.5), ("qa", args.qa_steps, 0.0)):
        if stages.index(state["stage"]) > stages.index(stage_name):
            continue
        tune_vision = stage_name == "qa" and args.tune_vision
        model.model.vision_tower.requires_grad_(tune_vision)
        vision = list(model.model.vision_tower.parameters()) if tune_vision else []
        others = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("model.vision_tower")]
        groups = [{"params": others, "scale": 1.0}]
        params = list(others)
        if tune_vision:
            # end-to-end: the encoder also keeps its CLIP objective on this batch's captions, so [CLS] stays a
            # contrastive summary (the property pruning methods rely on) while patches learn what QA needs
            clip.vision_model = model.model.vision_tower
            clip.train()
            encoded = {}  # the [CLS] output of the LLaVA forward's vision pass, reused by the contrastive loss
            cls_hook = model.model.vision_tower.register_forward_hook(
                lambda m, a, out: encoded.__setitem__("pooled", out.pooler_output))
            heads = [p for n, p in clip.named_parameters() if not n.startswith("vision_model")]
            groups += [{"params": vision, "scale": args.vision_lr_scale},
                       {"params": heads, "scale": args.vision_lr_scale}]
            params += vision + heads
        aux_heads = None
        if stage_name == "qa" and args.aux_until > state["step"]:
            # training aid: linear heads read --aux-targets of each visual token (its object's colour/shape/size,
            # its place in the grid) from the LLM input; dropped at --aux-until: object targets make every patch
            # carry its object's identity, which flatters random selection; the report measures what remains
            dim = config.text_config.hidden_size
            grid = int(image_tokens ** 0.5)
            classes = dict(zip(AUX_TARGETS, (len(synthetic.COLOURS) + 1, len(synthetic.SHAPES) + 1,
                                             len(synthetic.SIZES) + 1, grid, grid)))
            aux_columns = [AUX_TARGETS.index(t) for t in args.aux_targets]
            aux_heads = torch.nn.ModuleList([torch.nn.Linear(dim, classes[t]) for t in args.aux_targets]).to(device)
            # heads saved for other targets are not reused (fresh heads); checkpoints from before --aux-targets
            # hold the five heads' weights alone
            if aux_state is not None and aux_state.get("targets", list(AUX_TARGETS)) == args.aux_targets:
                aux_heads.load_state_dict(aux_state.get("heads", aux_state))
            groups.append({"params": list(aux_heads.parameters()), "scale": 1.0})
            captured = {}
            aux_hook = model.model.multi_modal_projector.register_forward_hook(
                lambda m, a, out: captured.__setitem__("tokens", out))
        optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
        warm_from = state["step"]
        if optimizer_state is not None:
            if [len(g["params"]) for g in optimizer_state["param_groups"]] == [len(g["params"]) for g in groups]:
                optimizer.load_state_dict(optimizer_state)
                for group, built in zip(optimizer.param_groups, groups):
                    group["scale"] = built["scale"]  # this run's --vision-lr-scale, not the checkpoint's
                warm_from = 0
            optimizer_state = None  # else: a new parameter set (vision unfrozen, aux dropped): fresh moments
        end = min(steps, args.stop_at) if stage_name == "qa" and args.stop_at is not None else steps
        for step in range(state["step"], end):
            if aux_heads is not None and step == args.aux_until:
                aux_hook.remove()
                aux_heads = None
            model.train()
            rng = np.random.default_rng([args.seed, step, TRAIN_STREAM, stages.index(stage_name)])
            rows, scenes, clip_only = [], [], []  # clip_only: images for the contrastive loss alone
            for _ in range(args.batch):
                scene, qa = training_turns(rng, args.image_size, args.turns, caption_prob, family_weights)
                jitter = args.position_jitter and rng.random() < args.position_jitter
                layout = jittered_layout(rng, image_tokens) if jitter else None
                if layout is not None and args.position_shuffle and rng.random() < args.position_shuffle:
                    layout = [int(q) for q in rng.permutation(layout)]
                rows.append(encode_turns(processor.tokenizer, qa, image_tokens, config.image_token_id, layout))
                scene, *twin = with_twin(rng, scene, tune_vision and args.hard_negatives)
                scenes.append(scene)
                clip_only += twin
            extra = []
            while tune_vision and len(extra) < args.clip_extra:
                extra += with_twin(rng, synthetic.make_scene(rng, args.image_size), args.hard_negatives)
            clip_only += extra
            input_ids, labels, positions, mask = collate(rows, config.text_config.pad_token_id)
            rewarm = min(1.0, (step - warm_from + 1) / 100)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, args.lr, 200 if stage_name == "align" else 100) * group.get(
                    "scale", 1.0) * rewarm
            pix = pixels([s.image for s in scenes], processor.image_processor).to(device)
            with autocast:
                loss = train_forward(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                     position_ids=positions.to(device), pixel_values=pix,
                                     labels=labels.to(device)).loss
                if aux_heads is not None:
                    tokens = captured["tokens"].float()  # (B, N, D) projected visual tokens
                    targets = patch_targets(scenes, grid).to(device)
                    loss = loss + args.aux_weight * sum(
                        torch.nn.functional.cross_entropy(head(tokens).flatten(0, 1), targets[..., i].flatten())
                        for i, head in zip(aux_columns, aux_heads))
                if tune_vision:
                    ids, text_mask = caption_ids(processor, scenes + clip_only)
                    pooled = encoded.pop("pooled")
                    if clip_only:
                        alone = pixels([s.image for s in clip_only], processor.image_processor).to(device)
                        pooled = torch.cat([pooled, vision_forward(pixel_values=alone).pooler_output])
                    contrastive = contrastive_loss(clip, pooled, ids.to(device), text_mask.to(device))
                    loss = loss + args.clip_weight * contrastive
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record = {"stage": stage_name, "step": step, "loss": round(loss.item(), 4),
                      "elapsed": round(time.time() - started)}
            if step % args.eval_every == 0 or step == end - 1:
                model.eval()
                with autocast:
                    result = evaluate(model, processor, dev, batch_size=70)
                record |= {"dev_accuracy": round(result["accuracy"], 4),
                           "dev_families": {k: round(v, 3) for k, v in sorted(result["families"].items())}}
            if step % 50 == 0 or "dev_accuracy" in record:
                log(log_path, record)
            if (step + 1) % args.save_every == 0:
                save(stage_name, step + 1, optimizer)
        if tune_vision:
            cls_hook.remove()
        # the last stage stays open at its final step: a resume with more --qa-steps trains on from there
        last = ("qa", max(end, state["step"])) if stage_name == "qa" else (stages[stages.index(stage_name) + 1], 0)
        save(*last, optimizer)

    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    info = {"recipe": recipe, "phases": state["phases"],
            "wall_time_s": round(time.time() - started),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                       f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}",
            "torch": torch.__version__}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {out} after {info['wall_time_s']} s")


if __name__ == "__main__":
    main()
