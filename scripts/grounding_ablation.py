"""The prefix-position x stats-loss ablation of docs/results.md ("Why the demo grounds"), as it was run.

A plain-PyTorch probe (no DeepSpeed, one process) on the demo's dataset and base: frozen SmolLM2-135M in bf16, prefix
fusion with 8 soft tokens, the demo's prompt (one-shot example with the train means) and target (the caption's
temperature sentence), number tokens x5, AdamW 2e-3 with 10 warm-up steps and a cosine to 0.1x, batch 8. It builds
the prompt / soft tokens / caption sequence by hand so both placements can be compared on one code path, and its
auxiliary loss regresses the caption's three temperature numbers (mean, min, max; the trainer's `stats_loss_weight`
uses every variable's `.json` stats instead). Every `eval_every` steps it writes greedy captions for the first
`n_eval` test samples and prints the mean-temperature MAE, the correlation and the baselines.

    make demo                                   # builds demo-output/ (dataset and base) first
    python scripts/grounding_ablation.py C pos=end aux=1.0 steps=200 threads=1
    python scripts/grounding_ablation.py D pos=start aux=1.0 steps=200 threads=1

Options (key=value): pos=start|end, aux (weight; 0 = off), steps, lr, nw (number-token weight), ntok, batch, example
(1: one-shot example in the prompt), eval_every, n_eval, threads, seed. Results go to /tmp/gx/NAME.json.
"""

import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from fusion_trainer.config import FusionConfig
from fusion_trainer.data.stream import decode_sample, epoch_samples, open_shards, render_prompt
from fusion_trainer.grounding import caption_target, number_token_mask, parse_caption_numbers
from fusion_trainer.model.fusion_model import FusionModel

ROOT = Path(__file__).resolve().parents[1]
name = sys.argv[1]
opt = dict(
    pos="start",
    steps=200,
    lr=2e-3,
    enc_lr_mult=1.0,
    aux=0.0,
    nw=5.0,
    ntok=8,
    batch=8,
    example=1,
    eval_every=100,
    n_eval=64,
    threads=2,
    depth=2,
    seed=0,
    warm=10,
    patch=4,
)
for a in sys.argv[2:]:
    k, v = a.split("=")
    opt[k] = type(opt[k])(v) if not isinstance(opt[k], str) else v
print(name, opt, flush=True)
torch.manual_seed(opt["seed"])
np.random.seed(opt["seed"])
torch.set_num_threads(int(opt.get("threads", 2)))
ds = open_shards((ROOT / "demo-output/dataset.ref").read_text().strip())
norm = {v: s.model_dump() for v, s in ds.manifest.normalization.items()}
fc = FusionConfig(
    fusion="prefix",
    n_prefix_tokens=opt["ntok"],
    d_encoder=256,
    encoder_depth=opt["depth"],
    encoder_heads=8,
    patch_size=opt["patch"],
    variables=ds.manifest.variable_names,
    normalization=norm,
)
model = FusionModel.from_base(str(ROOT / "demo-output/bases/smollm2-135m"), fc, dtype=torch.bfloat16)
tok = model.tokenizer


def load(split, limit=None):
    out = []
    for i, r in enumerate(epoch_samples(ds, split, epoch=0, rank=0, world=1, seed=0, shuffle=False)):
        if limit and i >= limit:
            break
        s = decode_sample(r, ds)
        t = caption_target(s.text, "temperature")
        n = parse_caption_numbers(t)
        out.append((s.climate_x, t, [n["t2m_mean_c"], n["t2m_min_c"], n["t2m_max_c"]]))
    return out


t0 = time.time()
train = load("train")
test = load("test", opt["n_eval"])
print("loaded", len(train), len(test), round(time.time() - t0), "s", flush=True)
Y = np.array([y for _, _, y in train])
ym, ys = Y.mean(0), Y.std(0)
tmpl = (
    "Example: {caption_example}\nDescribe this climate window:\n"
    if opt["example"]
    else "Describe this climate window:\n"
)
prompt = render_prompt(tmpl, ds, "temperature")
prompt_ids = tok(prompt)["input_ids"]
emb = model.arch.input_embeddings(model.lm)
aux_head = torch.nn.Linear(256, 3)
weights = 1.0 + (opt["nw"] - 1.0) * torch.from_numpy(number_token_mask(tok)).float()
enc_params = list(model.encoder.parameters())
fus_params = list(model.fusion.parameters())
groups = [
    dict(params=enc_params, lr=opt["lr"] * opt["enc_lr_mult"]),
    dict(params=fus_params + list(aux_head.parameters()), lr=opt["lr"]),
]
optim = torch.optim.AdamW(groups, weight_decay=0.0)
base_lrs = [g["lr"] for g in groups]


def embeds_for(climate, caps):
    tokens = model.encoder.encode(climate)
    prefix = model.fusion(tokens.tokens)  # (B, K, H)
    B = climate.shape[0]
    cap_ids = (
        [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in caps]
        if caps
        else [[] for _ in range(B)]
    )
    L = max(len(c) for c in cap_ids)
    ids = torch.full((B, L), tok.eos_token_id)
    lab = torch.full((B, L), -100)
    m = torch.zeros((B, L), dtype=torch.long)
    for i, c in enumerate(cap_ids):
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        lab[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        m[i, : len(c)] = 1
    p = emb(torch.tensor(prompt_ids)[None].expand(B, -1))
    c = emb(ids)
    K, P = prefix.shape[1], p.shape[1]
    if opt["pos"] == "start":
        e = torch.cat([prefix.to(p.dtype), p, c], 1)
    else:
        e = torch.cat([p, prefix.to(p.dtype), c], 1)
    full_lab = torch.cat([torch.full((B, P + K), -100), lab], 1)
    mask = torch.cat([torch.ones((B, P + K), dtype=torch.long), m], 1)
    return e, mask, full_lab, tokens


def loss_fn(batch):
    clim = torch.from_numpy(np.stack([b[0] for b in batch]))
    e, mask, lab, tokens = embeds_for(clim, [b[1] for b in batch])
    logits = model.lm(inputs_embeds=e, attention_mask=mask, use_cache=False).logits
    tgt = lab[:, 1:]
    valid = tgt != -100
    w = weights[tgt.clamp(min=0)] * valid
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        tgt.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(tgt.shape)
    lm_loss = (ce * w).sum() / w.sum()
    aux = torch.tensor(0.0)
    if opt["aux"] > 0:
        pred = aux_head(tokens.tokens.float().mean(1))
        y = torch.tensor((np.array([b[2] for b in batch]) - ym) / ys, dtype=torch.float32)
        aux = torch.nn.functional.mse_loss(pred, y)
    return lm_loss, aux


@torch.no_grad()
def evaluate():
    model.eval()
    preds = []
    for i in range(0, len(test), 16):
        batch = test[i : i + 16]
        clim = torch.from_numpy(np.stack([b[0] for b in batch]))
        e, mask, _, _ = embeds_for(clim, None)
        e = e[:, : e.shape[1]]
        gen = [[] for _ in batch]
        out = model.lm(inputs_embeds=e, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1)
        for _ in range(16):
            for j, t in enumerate(nxt.tolist()):
                gen[j].append(t)
            out = model.lm(inputs_embeds=emb(nxt[:, None]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
        for g in gen:
            txt = tok.decode(g)
            mm = re.search(r"was (-?\d+\.\d)", txt)
            preds.append(float(mm.group(1)) if mm else math.nan)
    model.train()
    p = np.array(preds)
    y = np.array([b[2][0] for b in test])
    ok = ~np.isnan(p)
    mae = float(np.abs(p[ok] - y[ok]).mean()) if ok.any() else math.nan
    corr = float(np.corrcoef(p[ok], y[ok])[0, 1]) if ok.sum() > 2 and p[ok].std() > 0 else 0.0
    base = float(np.abs(ym[0] - y).mean())
    best = float(np.abs(np.median(y) - y).mean())
    return dict(
        parsed=float(ok.mean()),
        mae=round(mae, 2),
        corr=round(corr, 3),
        distinct=len(set(p[ok].tolist())),
        base=round(base, 2),
        best_const=round(best, 2),
        sample=txt,
    )


rng = np.random.default_rng(opt["seed"])
order = rng.permutation(len(train))
pos = 0
model.train()
t0 = time.time()
hist = []
for step in range(1, opt["steps"] + 1):
    f = min(1.0, step / opt["warm"]) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / opt["steps"])))
    for g, b in zip(optim.param_groups, base_lrs, strict=True):
        g["lr"] = b * f
    if pos + opt["batch"] > len(order):
        order = rng.permutation(len(train))
        pos = 0
    batch = [train[k] for k in order[pos : pos + opt["batch"]]]
    pos += opt["batch"]
    lm_loss, aux = loss_fn(batch)
    loss = lm_loss + opt["aux"] * aux
    optim.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
    optim.step()
    if step % 10 == 0:
        print(
            f"step {step} lm {lm_loss.item():.3f} aux {aux.item():.3f} {(time.time() - t0) / step:.2f}s/step",
            flush=True,
        )
    if step % opt["eval_every"] == 0 or step == opt["steps"]:
        r = evaluate()
        r["step"] = step
        r["elapsed"] = round(time.time() - t0)
        print("EVAL", json.dumps(r), flush=True)
        hist.append(r)
Path("/tmp/gx").mkdir(exist_ok=True)
Path(f"/tmp/gx/{name}.json").write_text(json.dumps(dict(name=name, opt=opt, hist=hist)))
