"""Fine-tuning (parameter transfer) as library code: which layers train, at what learning rate, on which pixels.

Strategies (``train.finetune.strategy``):
  * ``head``: backbone frozen, head trained end to end on augmented images
  * ``last_n``: the last ``last_n`` blocks of the backbone are trained with the head
  * ``full``: everything is trained
  * ``staged``: ``head_epochs`` with the backbone frozen, then unfreeze (``last_n`` blocks, or all)

The backbone gets discriminative learning rates (:mod:`graft.layerwise`); frozen blocks stay in inference mode,
so their BatchNorm running statistics never move. :func:`fit` writes a checkpoint atomically after an epoch
(every ``checkpoint_seconds``) and resumes from one with the same key, ending with the same weights as an
uninterrupted run. Images reach it as batches from :mod:`graft.batches`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from graft import GraftError
from graft.atomic import BackgroundWriter, torch_bytes
from graft.batches import DecodedImages, image_batches, to_device
from graft.fold import fold_frozen_bn
from graft.frozen import ValActivations
from graft.heads import class_weights
from graft.images import Preprocess
from graft.layerwise import layer_groups, make_scheduler, param_groups, set_trainable, train_mode, trainable_groups
from graft.memory import keep_freed_memory
from graft.model import Classifier, classifier_from_payload
from graft.params import FinetuneParams
from graft.precision import cpu_bf16_layers, device_and_amp


@torch.no_grad()
def predict_logits(
    model: Classifier,
    paths: list[str],
    pp: Preprocess,
    batch_size: int = 64,
    workers: int = 2,
    amp: torch.dtype | None = None,
    decoded: DecodedImages | None = None,
) -> np.ndarray:
    """Logits for image files with the eval transform (val during training, with its ``amp``; test in fp32)."""
    device = next(model.parameters()).device
    model.eval()
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        out = [
            model.logits(to_device(x, device)).float().cpu().numpy()
            for _, x in image_batches(paths, pp, batch_size, workers, decoded=decoded)
        ]
    return np.concatenate(out) if out else np.zeros((0, model.head.n_classes), np.float32)


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict | None:
    """A training checkpoint (``weights_only=True``), None if absent; one clear error if unreadable."""
    if not path.is_file():
        return None
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or hostile file
        raise GraftError(
            f"checkpoint {path} is unreadable ({str(exc).splitlines()[0][:120]}); "
            "delete it or run `graft train --fresh`"
        ) from None
    return ck if isinstance(ck, dict) else None


def fit(
    model: Classifier,
    train_items: tuple[list[str], np.ndarray],
    val_items: tuple[list[str], np.ndarray],
    pp: Preprocess,
    fp: FinetuneParams,
    n_classes: int,
    seed: int,
    checkpoint: Path,
    key: str,
    class_weighted: bool = False,
    on_epoch_end: Callable[[int], None] | None = None,
) -> tuple[dict, list[dict], np.ndarray | None]:
    """Fine-tune ``model``; return the best state dict (lowest val loss), the history, and the best epoch's val
    logits (in the training precision; None after a resume from a checkpoint without them).

    Resumes from ``checkpoint`` when it holds a run with the same ``key``. A checkpoint is written after an epoch
    once ``fp.checkpoint_seconds`` have passed since the last one, never after the last epoch (the caller deletes
    it once the model is saved). For the length of the run, on CPU
    freed memory is kept for reuse (:func:`keep_freed_memory`), in bf16 on CPU the depthwise convolutions that
    are slow in bf16 stay fp32 and activations run out of place (:func:`cpu_bf16_layers`), and with
    ``freeze_bn`` every BatchNorm is folded into its convolution (:func:`fold_frozen_bn`).
    """
    device, amp = device_and_amp(fp.precision, pp.crop)
    with (
        BackgroundWriter() as writer,  # on exit the last checkpoint write has finished
        keep_freed_memory(device.type == "cpu"),
        cpu_bf16_layers(model, enabled=amp is torch.bfloat16 and device.type == "cpu"),
        fold_frozen_bn(model, model.logits, min(pp.crop, 64)) if fp.freeze_bn else contextlib.nullcontext(),
    ):
        if fp.threads:
            torch.set_num_threads(fp.threads)
        model.to(device).to(memory_format=torch.channels_last)
        groups = layer_groups(model.features.net)
        paths, y = train_items
        steps = math.ceil(len(paths) / fp.batch_size)
        set_trainable(model, groups, len(groups))  # every parameter that may ever train joins the optimizer
        # fused: one kernel over every tensor (Lite0's step on CPU: 3.3 ms against 20.9 for the per-tensor loop)
        opt = torch.optim.AdamW(param_groups(model, groups, fp), lr=fp.lr, fused=device.type in ("cpu", "cuda"))
        sched = make_scheduler(opt, fp, steps)
        weight = class_weights(y, n_classes).to(device) if class_weighted else None
        loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=fp.label_smoothing)
        scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
        ema = make_ema(model, fp.ema)
        judged = ema.module if ema else model  # validation, the best state and the result use the averaged weights
        start, best, best_loss, since, history = 0, copy.deepcopy(judged.state_dict()), float("inf"), 0, []
        best_logits: torch.Tensor | None = None
        ck = read_checkpoint(checkpoint, device)
        if ck and ck.get("key") == key:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            if ema and "ema" in ck:
                ema.module.load_state_dict(ck["ema"])
            start, best, best_loss, since, history = (ck[k] for k in ("epoch", "best", "best_loss", "since", "history"))
            best_logits = ck.get("best_logits")
        last_checkpoint = time.monotonic()
        yt, decoded, val_bs = torch.tensor(y, device=device), DecodedImages(pp.resize), 2 * fp.batch_size
        vp, vy = val_items if len(val_items[0]) else train_items
        val = ValActivations(  # the frozen groups' output on the val images is kept across epochs
            len(vp),
            lambda: (to_device(x, device) for _, x in image_batches(vp, pp, val_bs, fp.workers, decoded=decoded)),
            lambda m: predict_logits(m, vp, pp, val_bs, fp.workers, amp, decoded),
            amp,
        )
        for epoch in range(start, fp.epochs):
            if since >= fp.patience:
                break
            t_epoch = time.perf_counter()
            torch.manual_seed(seed * 100_003 + epoch)  # dropout etc.: the same draws after a resume
            n_train = trainable_groups(len(groups), fp, epoch)
            set_trainable(model, groups, n_train)
            train_mode(model, groups, fp.freeze_bn)
            order = np.random.default_rng([seed, epoch]).permutation(len(paths))
            shuffled = [paths[i] for i in order]
            total, correct = 0.0, 0
            bar = tqdm(
                image_batches(shuffled, pp, fp.batch_size, fp.workers, fp.augment, (seed, epoch), decoded),
                total=steps,
                desc=f"epoch {epoch + 1}/{fp.epochs}",
                unit="batch",
                disable=None,
                leave=False,
            )
            for sl, x in bar:
                target = yt[torch.as_tensor(order[sl.start : sl.stop], device=device)]
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    logits = model.logits(to_device(x, device))
                    loss = loss_fn(logits.float(), target)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                if ema:
                    ema.update(model, step=epoch * steps + sl.start // fp.batch_size)
                total += loss.item() * len(target)
                correct += int((logits.argmax(1) == target).sum())
                bar.set_postfix(loss=f"{loss.item():.3f}")
            raw = torch.from_numpy(val.logits(judged, len(groups) - n_train))
            z = raw / judged.temperature
            val_loss = float(nn.functional.cross_entropy(z, torch.tensor(vy)))
            row = {
                "epoch": epoch + 1,
                "train_loss": total / len(paths),
                "train_accuracy": correct / len(paths),
                "val_loss": val_loss,
                "val_accuracy": float((z.argmax(1).numpy() == vy).mean()),
                "trainable_groups": n_train,
            }
            history.append(row)
            print(
                f"epoch {epoch + 1}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
                f"val loss {val_loss:.4f} acc {row['val_accuracy']:.4f} | {time.perf_counter() - t_epoch:.1f} s"
            )
            if val_loss < best_loss - 1e-6:
                best, best_loss, since, best_logits = copy.deepcopy(judged.state_dict()), val_loss, 0, raw
            else:
                since += 1
            final = epoch + 1 == fp.epochs or since >= fp.patience
            if not final and time.monotonic() - last_checkpoint >= fp.checkpoint_seconds:
                state = {
                    "key": key,
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "best": best,
                    "best_loss": best_loss,
                    "since": since,
                    "history": history,
                    "best_logits": best_logits,
                    **({"ema": ema.module.state_dict()} if ema else {}),
                }
                # serialised here (a snapshot), written and fsynced in the background while the next epoch runs
                writer.submit(checkpoint, torch_bytes(state))
                last_checkpoint = time.monotonic()
            if on_epoch_end:
                writer.wait()  # the callback sees this epoch's checkpoint on disk
                on_epoch_end(epoch + 1)
        kept = None if best_logits is None else best_logits.numpy()
        return {k: v.cpu() for k, v in best.items()}, history, kept


def make_ema(model: Classifier, decay: float | None) -> Any:
    """timm's weight EMA with warm-up, or None. The warm-up (decay ramps from 0 towards ``decay`` as
    1 - (1 + step)^-2/3) matters on small data: a few hundred steps at a flat 0.999 would average in
    mostly the initial weights."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True)


def classifier_logits(payload: dict, paths: list[str]) -> np.ndarray:
    """Logits of a saved model (either kind) on image files, with the eval transform."""
    model, bb = classifier_from_payload(payload)
    return predict_logits(model, paths, bb.preprocess)
