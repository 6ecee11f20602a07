"""Train the shipped model from a seed: ``python -m mmprune.zoo.train --out DIR``.

Three stages, as LLaVA-1.5 is built (the vision encoder stays frozen after stage 1, as LLaVA-1.5 keeps CLIP
frozen):

1. ``clip``  — a CLIP vision encoder trained contrastively against generated captions (HF ``CLIPModel`` with a
   small text tower, loss at the [CLS] output). Nothing else teaches the encoder, so [CLS] attention concentrates
   on the objects a caption names and object identity stays in the object's own patches.
2. ``align`` — projector alignment: captions ("describe the image .") and QA turns. LLaVA trains only the projector
   here because its LLM is pretrained; ours starts from scratch, so the LLM trains too (a deliberate difference).
3. ``qa``    — end-to-end instruction tuning (projector + LLM) on several QA turns per image in the chat format
   the processor writes: ``USER: <image>\\n{q} ASSISTANT: {a} </s>USER: {q2} ASSISTANT: ...``.

No auxiliary losses. Data are drawn on the fly from the synthetic generator (training stream of the seed; the
benchmark and the dev set use other streams). A checkpoint is written every ``--save-every`` steps and at each
stage's end; ``--resume`` continues from it. The finished model and its processor are saved with
``save_pretrained`` (safetensors) into ``--out``, with ``training.json`` (recipe, wall time, machine, dev curve).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
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


def training_turns(rng, size: int, turns: int, caption_prob: float) -> tuple:
    """A scene and up to ``turns`` distinct (question, answer) pairs about it, one per family first."""
    family = synthetic.FAMILIES[int(rng.integers(len(synthetic.FAMILIES)))]
    scene = synthetic.scene_for(rng, family, size)
    qa: dict[str, str] = {}
    if rng.random() < caption_prob:
        qa["describe the image ."] = synthetic.caption(scene)
    for _ in range(3 * turns):
        if len(qa) >= turns:
            break
        asked = synthetic.ask(rng, scene, synthetic.FAMILIES[int(rng.integers(len(synthetic.FAMILIES)))])
        if asked is not None:
            qa.setdefault(asked[0], asked[1][0])
    order = list(qa.items())
    rng.shuffle(order)
    return scene, order


def encode_turns(tokenizer, qa: list[tuple[str, str]], image_tokens: int, image_token_id: int):
    """Token ids and labels (answers + </s> only) of a multi-turn chat, identical to the processor's encoding of
    the first turn (the test suite checks it)."""
    ids, labels = [], []
    pieces: list[tuple[str | None, bool]] = []  # (text, or None for the image; supervised?)
    for i, (question, answer) in enumerate(qa):
        if i == 0:
            pieces += [("USER:", False), (None, False), (f"{question} ASSISTANT:", False)]
        else:
            pieces.append((f"USER: {question} ASSISTANT:", False))
        pieces.append((f"{answer} </s>", True))
    texts = [t for t, _ in pieces if t is not None]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
    for text, supervised in pieces:
        chunk = [image_token_id] * image_tokens if text is None else next(encoded)
        ids += chunk
        labels += chunk if supervised else [-100] * len(chunk)
    return ids, labels


def collate(rows, pad_id: int):
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):  # right padding for training
        input_ids[r, :len(ids)] = torch.tensor(ids)
        labels[r, :len(lab)] = torch.tensor(lab)
        mask[r, :len(ids)] = 1
    return input_ids, labels, mask


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


def clip_batch(rng, processor, size: int, batch: int):
    scenes = [synthetic.make_scene(rng, size) for _ in range(batch)]
    captions = [synthetic.caption(s) + " </s>" for s in scenes]
    rows = processor.tokenizer(captions, add_special_tokens=False)["input_ids"]
    # the CLIP text tower pools at the first </s>: right padding keeps it after the caption
    width = max(len(row) for row in rows)
    ids = torch.full((batch, width), processor.tokenizer.pad_token_id)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    return pixels([s.image for s in scenes], processor.image_processor), ids, mask


def log(path: Path, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


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
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--dev", type=int, default=280, help="dev questions per evaluation")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast for matmuls (CPU AMX / GPU); weights stay fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
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
    state = {"stage": "clip", "step": 0, "elapsed": 0.0}
    optimizer_state = None
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        clip.load_state_dict(ckpt["clip"])
        state, optimizer_state = ckpt["state"], ckpt["optimizer"]
        print(f"resumed at stage {state['stage']} step {state['step']}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    dev = synthetic.generate(args.dev, seed=DEV_SEED, size=args.image_size)
    image_tokens = (args.image_size // args.patch_size) ** 2
    started = time.time() - state["elapsed"]

    def save(stage: str, step: int, optimizer) -> None:
        state.update(stage=stage, step=step, elapsed=time.time() - started)
        torch.save({"model": model.state_dict(), "clip": clip.state_dict(), "state": state,
                    "optimizer": optimizer.state_dict()}, ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)

    stages = ["clip", "align", "qa", "done"]
    if stages.index(state["stage"]) == 0:
        params = list(clip.parameters())
        optimizer = torch.optim.AdamW(params, lr=args.clip_lr, weight_decay=0.1)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        clip.train()
        for step in range(state["step"], args.clip_steps):
            rng = np.random.default_rng([args.seed, step, TRAIN_STREAM, 0])
            pix, ids, mask = clip_batch(rng, processor, args.image_size, args.clip_batch)
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
        model.model.vision_tower.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
            optimizer_state = None
        for step in range(state["step"], steps):
            model.train()
            rng = np.random.default_rng([args.seed, step, TRAIN_STREAM, stages.index(stage_name)])
            rows, images = [], []
            for _ in range(args.batch):
                scene, qa = training_turns(rng, args.image_size, args.turns, caption_prob)
                rows.append(encode_turns(processor.tokenizer, qa, image_tokens, config.image_token_id))
                images.append(scene.image)
            input_ids, labels, mask = collate(rows, config.text_config.pad_token_id)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, args.lr, 200 if stage_name == "align" else 100)
            with autocast:
                loss = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             pixel_values=pixels(images, processor.image_processor).to(device),
                             labels=labels.to(device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record = {"stage": stage_name, "step": step, "loss": round(loss.item(), 4),
                      "elapsed": round(time.time() - started)}
            if step % args.eval_every == 0 or step == steps - 1:
                model.eval()
                with autocast:
                    result = evaluate(model, processor, dev, batch_size=70)
                record |= {"dev_accuracy": round(result["accuracy"], 4),
                           "dev_families": {k: round(v, 3) for k, v in sorted(result["families"].items())}}
            if step % 50 == 0 or "dev_accuracy" in record:
                log(log_path, record)
            if (step + 1) % args.save_every == 0:
                save(stage_name, step + 1, optimizer)
        save(stages[stages.index(stage_name) + 1], 0, optimizer)

    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    info = {"recipe": {k: v for k, v in vars(args).items() if k not in ("out", "resume")},
            "wall_time_s": round(time.time() - started),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                       f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}",
            "torch": torch.__version__}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {out} after {info['wall_time_s']} s")


if __name__ == "__main__":
    main()
