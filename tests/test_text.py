"""Text prompts (issue 30): the tokenizer, the text encoder's padding mask, prompt dropout, guidance with a negative
prompt, the compositional hold-out filter (data.exclude), a tiny text run (pixel and latent) trained and sampled
through the Pipeline and the CLI, and bad input as one line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import torchdiffusion as td
from torchdiffusion.cli import main
from torchdiffusion.data.datasets import captions, load, split_dataset
from torchdiffusion.data.folder import ImageFolder, stream
from torchdiffusion.data.shapes import write_shapes
from torchdiffusion.data.tokenizer import PAD_ID, UNK_ID, CaptionTokenizer, PromptTruncatedWarning
from torchdiffusion.nets.text import TextEncoder, TextUNet
from torchdiffusion.parameterization.guidance import CFG
from torchdiffusion.runs import config
from torchdiffusion.runs.train import build_trainer, drop_labels, train, train_dataset

CAPS = ["a small red star in the upper left on a plain background",
        "a large blue circle at the top on a striped background",
        "a medium green triangle in the center on a checkered background"]
EXCLUDE = [{"shape": "triangle", "color": "blue"}, {"shape": "star", "size": "large", "position": "lower right"}]


def _tok(max_length: int = 16) -> CaptionTokenizer:
    return CaptionTokenizer.train(CAPS, vocab_size=64, max_length=max_length)


# --- tokenizer -----------------------------------------------------------------------------------------------
def test_tokenizer_round_trip_unknown_words_and_padding():
    tok = _tok()
    ids = tok.encode(CAPS)
    assert ids.shape == (3, 16) and ids.dtype == np.int64
    for row, cap in zip(ids, CAPS):
        assert tok.decode(row) == cap  # every training word has its own id: the caption comes back
        n = len(cap.split())
        assert (row[:n] > UNK_ID).all() and (row[n:] == PAD_ID).all()
    # case and Unicode width are normalised; an unknown word is [UNK], never an error
    a, b = tok.encode(["A RED Ｓtar", "a red zebra"])
    assert (a == tok.encode("a red star")[0]).all()
    assert list(b[:3]) == [a[0], a[1], UNK_ID] and tok.words("a red zebra") == ["a", "red", "[UNK]"]
    assert (tok.encode("")[0] == PAD_ID).all() and (tok.encode("   ")[0] == PAD_ID).all()  # empty = no text
    assert tok.vocab_size == 2 + len({w for c in CAPS for w in c.split()})
    with pytest.raises(TypeError, match="prompt must be a string"):
        tok.encode([3])


def test_tokenizer_truncates_long_prompts_with_a_warning():
    tok = _tok(max_length=4)
    with pytest.warns(PromptTruncatedWarning, match="truncated to the first 4"):
        ids = tok.encode(CAPS[0])
    assert tok.decode(ids[0]) == "a small red star"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode("a red star")  # 3 tokens: no warning


def test_tokenizer_saved_and_loaded_from_a_folder(tmp_path):
    tok = _tok()
    path = tok.save(tmp_path)
    assert path == tmp_path / "tokenizer.json" and not list(tmp_path.glob("*.tmp*"))
    back = CaptionTokenizer.load(tmp_path)
    assert back.max_length == 16
    prompts = [*CAPS, "a purple zebra", ""]
    assert (back.encode(prompts) == tok.encode(prompts)).all()
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a caption tokenizer"):
        CaptionTokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="missing tokenizer"):
        CaptionTokenizer.load(tmp_path / "nothing.json")


# --- text encoder ----------------------------------------------------------------------------------------------
def _ids(tok: CaptionTokenizer, *texts: str) -> torch.Tensor:
    return torch.from_numpy(tok.encode(list(texts)))


def test_padding_is_masked_in_the_encoder_and_in_cross_attention():
    torch.manual_seed(0)
    tok = _tok(8)
    net = TextUNet(64, 8, text_dim=16, text_layers=2, text_heads=2, in_channels=3, image_size=8, channels=8,
                   channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), groups=8).eval()
    for p in net.unet.parameters():  # the zero-initialised output layers would hide everything
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    ids = _ids(tok, "a red star", "a large blue circle at the top")
    keep = ids > 0
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        states, mask = net.text(ids)
        out = net(x, t, ids)
        # what padding carries (its token embedding and the positions it sits at) is changed ...
        # (random vectors: LayerNorm would cancel a constant shift)
        net.text.token.weight[PAD_ID] += torch.randn(16)
        net.text.position[1:][~keep[0]] += torch.randn(int((~keep[0]).sum()), 16)
        states2, _ = net.text(ids)
        out2 = net(x, t, ids)
        # ... and nothing downstream of the kept tokens changes; a change of a real word does change it
        net.text.token.weight[ids[0, 1]] += torch.randn(16)
        out3 = net(x, t, ids)
    assert mask.shape == (2, 9) and mask[:, 0].all() and (mask[:, 1:] == keep).all()
    assert torch.allclose(states[0][mask[0]], states2[0][mask[0]], atol=1e-6)
    assert not torch.allclose(states[0][~mask[0]], states2[0][~mask[0]])
    assert torch.allclose(out[0], out2[0], atol=1e-6)  # (sample 1 has real words at those positions)
    assert not torch.allclose(out[1], out2[1], atol=1e-4)
    assert not torch.allclose(out[0], out3[0], atol=1e-4)
    # the null condition (-1 rows, as written by prompt dropout and CFG) is the empty prompt
    with torch.no_grad():
        assert torch.equal(net(x, t, torch.full((2, 8), -1)), net(x, t, _ids(tok, "", "")))
        assert torch.equal(net(x, t, None), net(x, t, _ids(tok, "", "")))
    with pytest.raises(ValueError, match="token ids of shape"):
        net(x, t, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="exceed the text encoder's max_length"):
        TextEncoder(64, 4, 16, 1, 2)(torch.ones(1, 5, dtype=torch.long))


def test_prompt_dropout_replaces_whole_prompts_by_the_null_condition():
    ids = torch.arange(1, 1 + 400 * 6).reshape(400, 6)
    out = drop_labels(ids, 0.3, torch.Generator().manual_seed(0))
    dropped = (out == -1).all(1)
    assert ((out == -1).any(1) == dropped).all()  # a row is dropped whole or kept whole
    assert torch.equal(out[~dropped], ids[~dropped])
    assert 0.2 < dropped.float().mean() < 0.4


class _Linear:
    """A fake model: predict(x, t, cond) = (x + f(cond), x - f(cond)) with f the row sum of the token ids."""

    process = td.DDPM(T=10)

    def predict(self, x, t, cond):
        f = cond.float().sum(1).reshape(-1, 1, 1, 1)
        return x + f, x - f


def test_cfg_negative_prompt_replaces_the_unconditional_branch():
    x = torch.zeros(2, 1, 2, 2)
    pos, neg = torch.tensor([[3, 4, 1], [5, 0, 0]]), torch.tensor([[2, 0, 0], [7, 7, 1]])
    w = 2.0
    x0, _ = CFG(_Linear(), w, negative=True).predict(x, 5, torch.stack([pos, neg], 1))
    expect = (1 + w) * pos.sum(1) - w * neg.sum(1)
    assert torch.equal(x0[:, 0, 0, 0], expect.float())
    x0_null, _ = CFG(_Linear(), w).predict(x, 5, pos)  # null = all -1 tokens
    assert torch.equal(x0_null[:, 0, 0, 0], ((1 + w) * pos.sum(1) - w * (-3)).float())
    with pytest.raises(ValueError, match="needs cond of shape"):
        CFG(_Linear(), w, negative=True).predict(x, 5, pos)


# --- the compositional hold-out --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "shapes"
    write_shapes(out, 200, n_test=10, size=16, seed=0)
    return out


def _rows(folder: Path) -> dict[str, dict]:
    return {r["file_name"]: r for r in map(json.loads, (folder / "metadata.jsonl").read_text().splitlines())}


def _matches(row: dict) -> bool:
    return any(all(row[k] == v for k, v in e.items()) for e in EXCLUDE)


def test_exclude_leaves_out_every_matching_row_and_only_those(shapes):
    rows = _rows(shapes / "train")
    n_match = sum(map(_matches, rows.values()))
    assert n_match > 0  # the data hold examples of the held-out combinations
    full = ImageFolder(shapes / "train", 16)
    ds = ImageFolder(shapes / "train", 16, exclude=EXCLUDE)
    assert len(ds) == len(full) - n_match and ds.meta["excluded"] == n_match
    kept = [ds.path(i).relative_to(shapes / "train").as_posix() for i in range(len(ds))]
    assert not any(_matches(rows[f]) for f in kept)
    assert len(kept) == len(set(kept)) and {f for f, r in rows.items() if not _matches(r)} == set(kept)
    # nothing excluded is ever yielded, through the training stream (token ids as y) and the captions
    cfg = config.resolve(None, [f"data.name={shapes / 'train'}", "data.size=16", "model.net=unet_text",
                                f"data.exclude={json.dumps(EXCLUDE)}", "model.text_vocab=64"])
    data = train_dataset(cfg)
    caps = captions(data)
    assert not any("blue triangle" in c for c in caps)
    assert not any(c.startswith("a large") and "star in the lower right" in c for c in caps)
    assert any("blue" in c for c in caps) and any("triangle" in c for c in caps)  # the words alone are seen
    batches = stream(data, batch=16, seed=0)
    ys = torch.cat([next(batches)[1] for _ in range(len(data) // 16 + 1)])
    assert ys.shape[1] == 24 and (ys[:, 0] > 1).all()  # token ids of captions (no [UNK]: trained on them)


def test_exclude_bad_input_is_one_line(shapes, tmp_path):
    with pytest.raises(ValueError, match="names column\\(s\\) 'colour'"):
        ImageFolder(shapes / "train", 16, exclude=[{"colour": "blue"}])
    with pytest.raises(ValueError, match="data.exclude must be a list of objects"):
        config.resolve(None, ['data.exclude=[{"shape": ["a"]}]'])
    with pytest.raises(ValueError, match="data.exclude must be a list of objects"):
        config.resolve(None, ["data.exclude=[{}]"])
    with pytest.raises(ValueError, match="not an image folder"):
        load("digits", exclude=EXCLUDE)
    with pytest.raises(ValueError, match="left out all"):
        ImageFolder(shapes / "train", 16, exclude=[{"size": s} for s in ("small", "medium", "large")])


# --- a tiny text run ---------------------------------------------------------------------------------------------
TINY = ["data.size=16", "data.holdout=0.1", "model.net=unet_text", "model.channels=8", "model.channel_mult=[1,2]",
        "model.num_res_blocks=1", "model.attn_resolutions=[8]", "model.text_dim=16", "model.text_layers=1",
        "model.text_heads=2", "model.text_vocab=64", "model.text_length=16", "process.T=100", "train.steps=4",
        "train.batch=8", "train.lr=0.01", "train.warmup=0", "train.ema=0", "train.ckpt_every=2", "train.log_every=1",
        "sample.steps=3", "train.threads=1"]


@pytest.fixture(scope="module")
def text_run(shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "text"
    cfg = config.resolve(None, [f"data.name={shapes / 'train'}", *TINY, f"data.exclude={json.dumps(EXCLUDE)}"])
    train(cfg, out, progress=False, stop_after=2)
    train(cfg, out, progress=False)  # resumed: the saved tokenizer is loaded, not retrained
    return out


def test_text_run_trains_and_samples_from_prompts(text_run, shapes):
    saved = json.loads((text_run / "config.json").read_text())
    assert saved["run"]["text"] == {"tokenizer": "tokenizer.json", "vocab_size": saved["run"]["text"]["vocab_size"],
                                    "max_length": 16}
    assert saved["run"]["num_classes"] is None
    tok = CaptionTokenizer.load(text_run)
    # trained on the training split's captions only: every word of the captions is known
    assert UNK_ID not in tok.encode(captions(split_dataset(ImageFolder(shapes / "train", 16), 0.1)[0]))
    pipe = td.Pipeline.from_pretrained(text_run)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    x = pipe(n=2, prompt=["a red star", "a blue triangle"], guidance=3.0, generator=g())
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    # the empty prompt is the unconditional model; a prompt changes the samples
    assert torch.equal(pipe(n=2, prompt="", generator=g()), pipe(n=2, generator=g()))
    assert (pipe(n=2, prompt="a red star", generator=g()) - pipe(n=2, generator=g())).abs().max() > 1e-3
    # the negative prompt is used: "" as the negative prompt is plain CFG, another one differs
    plain = pipe(n=2, prompt="a red star", guidance=3.0, generator=g())
    assert torch.allclose(pipe(n=2, prompt="a red star", guidance=3.0, negative_prompt="", generator=g()), plain,
                          atol=1e-6)
    neg = pipe(n=2, prompt="a red star", guidance=3.0, negative_prompt=["a blue circle", "a star"], generator=g())
    assert (neg - plain).abs().max() > 1e-3
    # one prompt for all equals the same prompt repeated; max_batch does not matter
    assert torch.allclose(pipe(n=2, prompt="a red star", generator=g()),
                          pipe(n=2, prompt=["a red star"] * 2, generator=g(), max_batch=1), atol=1e-5)
    # the same through the CLI
    png = text_run.parent / "cli.png"
    assert main(["sample", str(text_run), "--n", "2", "--prompt", "a red star", "--guidance", "3",
                 "--negative-prompt", "a blue circle", "--quiet", "--out", str(png)]) == 0
    assert png.is_file()
    # save_pretrained carries the tokenizer
    again = td.Pipeline.from_pretrained(pipe.save_pretrained(text_run.parent / "copy"))
    assert torch.equal(again(n=2, prompt="a red star", generator=g()), pipe(n=2, prompt="a red star", generator=g()))


def test_prompt_bad_input_is_one_line(text_run, tmp_path, capsys):
    pipe = td.Pipeline.from_pretrained(text_run)
    with pytest.warns(PromptTruncatedWarning):
        pipe(n=1, prompt=" ".join(["red"] * 40))
    with pytest.raises(ValueError, match="give prompt=..., not class_labels"):
        pipe(n=1, class_labels=1)
    with pytest.raises(ValueError, match="one string or 2 strings"):
        pipe(n=2, prompt=["a", "b", "c"])
    with pytest.raises(ValueError, match="negative_prompt needs guidance"):
        pipe(n=1, prompt="a", negative_prompt="b")
    with pytest.raises(ValueError, match="guidance needs"):
        pipe(n=1, guidance=1.0)
    # a prompt for a run without a text encoder
    digits = tmp_path / "digits"
    train(config.resolve("digits", ["train.steps=1", "train.batch=4", "model.channels=8", "train.ckpt_every=0"]),
          digits, progress=False)
    with pytest.raises(ValueError, match="this run has no text encoder"):
        td.Pipeline.from_pretrained(digits)(n=1, prompt="a red star")
    capsys.readouterr()
    assert main(["sample", str(digits), "--n", "1", "--prompt", "a red star", "--out", str(tmp_path / "x.png")]) != 0
    err = capsys.readouterr().err.strip()
    assert "this run has no text encoder" in err and len(err.splitlines()) == 1


def _captioned(tmp_path: Path, caption_line: bytes) -> Path:
    from PIL import Image
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 50, 0, 0)).save(folder / f"{i}.png")
    lines = [json.dumps({"file_name": f"{i}.png", "text": "a red square"}).encode() for i in range(2)]
    (folder / "metadata.jsonl").write_bytes(b"\n".join([*lines, b'{"file_name": "2.png", "text": "' + caption_line
                                                        + b'"}']) + b"\n")
    return folder


@pytest.mark.parametrize("bad,why", [(b"a red \\u0007 square", "control characters"),
                                     (b"a red \xff square", "not UTF-8"),
                                     (b"a red \x07 square", "control character")])
def test_bad_captions_are_one_line_naming_the_row(tmp_path, bad, why):
    folder = _captioned(tmp_path, bad)
    cfg = config.resolve(None, [f"data.name={folder}", *TINY])
    with pytest.raises(ValueError, match=f"line 3: .*{why}"):
        build_trainer(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "tokenizer.json").exists()


def test_bad_caption_through_the_cli_is_one_line(tmp_path, capsys):
    from helpers import one_line_error
    folder = _captioned(tmp_path, b"a red \xff square")
    line = one_line_error(capsys, "train", "shapes32_text", "--out", str(tmp_path / "run"), "--set",
                          f"data.name={folder}", "--set", "data.size=16")
    assert "metadata.jsonl line 3: not UTF-8" in line
    assert not (tmp_path / "run" / "tokenizer.json").exists()


def test_text_run_needs_captions(tmp_path):
    with pytest.raises(ValueError, match="conditioned on captions, but the data"):
        train_dataset(config.resolve(None, ["data.name=digits", *TINY]))


def test_text_presets_hold_out_combinations_that_exist_in_the_shapes_data():
    from torchdiffusion.data.shapes import ATTRIBUTES
    for name in ("shapes32_text", "latent_shapes32_text"):
        cfg = config.resolve(name)
        assert cfg["model"]["net"] == "unet_text" and cfg["loss"]["p_uncond"] > 0
        assert cfg["data"]["exclude"] == config.TEXT_HOLDOUT and not cfg["data"]["flip"]  # a flip swaps left/right
        assert not cfg["data"]["conditional"]
    for pattern in config.TEXT_HOLDOUT:
        assert all(v in ATTRIBUTES[k] for k, v in pattern.items())


def test_latent_text_run_vae_then_latent_unet_with_prompts(shapes, tmp_path):
    vae = tmp_path / "vae"
    train(config.resolve("vae_images", [f"data.name={shapes / 'train'}", "data.size=16", "model.channels=8",
                                        "model.channel_mult=[1,2]", "train.steps=2", "train.batch=8",
                                        "train.ckpt_every=0", "train.threads=1"]), vae, progress=False)
    run = tmp_path / "latent"
    tiny = [s for s in TINY if not s.startswith(("data.size", "model.attn_resolutions"))]
    cfg = config.resolve("latent_shapes32_text", [f"data.autoencoder={vae}", *tiny, "model.attn_resolutions=[4]"])
    data = train_dataset(cfg)
    n_match = sum(map(_matches, _rows(shapes / "train").values()))
    kept = 200 - n_match  # latents of the kept rows, less data.holdout = 0.1 of them; token ids as y
    assert len(data) == kept - round(0.1 * kept) and data.y.shape == (len(data), 16)
    assert not any("blue triangle" in c for c in captions(data))
    train(cfg, run, progress=False)
    assert (run / "tokenizer.json").is_file()
    pipe = td.Pipeline.from_pretrained(run)
    x = pipe(n=2, prompt=["a red star", "a green circle"], guidance=2.0, negative_prompt="a square",
             generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()  # decoded images, not 8x8x4 latents
