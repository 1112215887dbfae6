"""Caption metrics: the coco-caption scorers (pycocoevalcap) on text the project tokenizes itself.

Tokenisations (all lower-case and drop tokens made only of Unicode punctuation, category P*):

- ``char`` (the paper's, default): drop whitespace and punctuation, one token per character.
- ``word``: jieba segmentation, as the AIC-ICC official scorer does.
- ``whitespace``: the text is already segmented (e.g. COCO-CN's released files); split on spaces.

pycocoevalcap's PTB tokenizer is never used: it is an English tokenizer and mangles Chinese.
BLEU (corpus level, closest reference length), ROUGE-L (beta 1.2) and CIDEr-D (n=4, sigma=6,
idf from the scored set's references) come from pycocoevalcap. METEOR 1.5 runs its jar through
our own subprocess wrapper (`MeteorJar`) because pycocoevalcap's wrapper hard-codes every
matching module (stem/synonym/paraphrase load an English paraphrase table for ~10 s and never
match Chinese) and keeps a process alive until garbage collection. We pass ``-m exact``; the
scores are identical and start-up takes ~1 s. Note that ``-norm`` makes METEOR split CJK text
into characters, so METEOR is effectively character level under every tokenisation (this is why
COCO-CN's official word-level METEOR equals the character-level one in ERNIE-ViLG Table 3).
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ernie_vilg.data.readers import load_json

log = logging.getLogger(__name__)

TOKENIZATIONS = ("char", "word", "whitespace")
METRICS = ("BLEU", "METEOR", "ROUGE-L", "CIDEr")


class CaptionDataError(ValueError):
    """Bad caption input: the message names the file and line (or the item id)."""


# ----------------------------------------------------------------------------- tokenisation


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


def _drop_punct_tokens(tokens: Iterable[str]) -> list[str]:
    return [t for t in tokens if t and not all(_is_punct(c) for c in t)]


def char_tokens(text: str) -> list[str]:
    """The paper's character level: no whitespace, no punctuation, lower-case, one token per char."""
    return [c for c in text.lower() if not c.isspace() and not _is_punct(c)]


def whitespace_tokens(text: str) -> list[str]:
    """Pre-segmented text: lower-case, split on whitespace, drop punctuation-only tokens."""
    return _drop_punct_tokens(text.lower().split())


_jieba = None


def word_tokens(text: str) -> list[str]:
    """jieba word segmentation (imported lazily: loading its dictionary takes about a second)."""
    global _jieba
    if _jieba is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        _jieba = jieba
    return _drop_punct_tokens(t.strip() for t in _jieba.cut(text.lower()))


_TOKENIZERS = {"char": char_tokens, "word": word_tokens, "whitespace": whitespace_tokens}


def tokenize(text: str, tokenization: str = "char") -> list[str]:
    if tokenization not in _TOKENIZERS:
        raise ValueError(f"unknown tokenization {tokenization!r}; choose one of {TOKENIZATIONS}")
    return _TOKENIZERS[tokenization](text)


def has_content(text: str) -> bool:
    """True when the text keeps at least one token under every tokenisation."""
    return bool(char_tokens(text))


# ----------------------------------------------------------------------------- readers


def iter_json_lines(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) of a JSONL file; errors name the file and line."""
    if not path.is_file():
        raise CaptionDataError(f"{path}: file not found")
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CaptionDataError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CaptionDataError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise CaptionDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if "id" not in obj or not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
                raise CaptionDataError(f"{where}: missing 'id' (a string or an integer)")
            yield line_no, obj


def _check_caption(caption: Any, where: str, field: str) -> str:
    if not isinstance(caption, str):
        raise CaptionDataError(f"{where}: '{field}' must be a string, got {type(caption).__name__}")
    if not has_content(caption):
        raise CaptionDataError(f"{where}: empty caption in '{field}' (nothing left after removing whitespace and punctuation)")
    return caption


def read_pred_jsonl(path: str | Path) -> dict[str, str]:
    """PRED file: lines ``{"id": ..., "caption": "..."}``. Ids are compared as strings."""
    path = Path(path)
    preds: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line_no, obj in iter_json_lines(path):
        where = f"{path}:{line_no}"
        key = str(obj["id"])
        if key in preds:
            raise CaptionDataError(f"{where}: duplicate id {key!r} (first on line {first_line[key]})")
        preds[key] = _check_caption(obj.get("caption"), where, "caption")
        first_line[key] = line_no
    if not preds:
        raise CaptionDataError(f"{path}: no predictions")
    return preds


def read_ref_jsonl(path: str | Path) -> dict[str, list[str]]:
    """REF file: lines ``{"id": ..., "captions": ["...", ...]}``."""
    path = Path(path)
    refs: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    for line_no, obj in iter_json_lines(path):
        where = f"{path}:{line_no}"
        key = str(obj["id"])
        if key in refs:
            raise CaptionDataError(f"{where}: duplicate id {key!r} (first on line {first_line[key]})")
        caps = obj.get("captions")
        if not isinstance(caps, list) or not caps:
            raise CaptionDataError(f"{where}: 'captions' must be a non-empty list of strings")
        refs[key] = [_check_caption(c, where, f"captions[{i}]") for i, c in enumerate(caps)]
        first_line[key] = line_no
    if not refs:
        raise CaptionDataError(f"{path}: no references")
    return refs


def read_coco_refs(path: str | Path) -> dict[str, list[str]]:
    """References of a COCO caption JSON (``images`` + ``annotations``), keyed by image id."""
    from ernie_vilg.data.readers import load_coco_captions

    refs = {str(img.id): img.captions for img in load_coco_captions(path)}
    empty = [k for k, v in refs.items() if not v]
    if empty:
        raise CaptionDataError(f"{path}: {len(empty)} image(s) without any caption, e.g. id {empty[0]}")
    return refs


def read_coco_results(path: str | Path) -> dict[str, str]:
    """Predictions in either coco-caption format, keyed by image id (as a string).

    - a results list ``[{"image_id": ..., "caption": "..."}, ...]`` (what coco-caption's loadRes takes);
    - an evaluation dump ``{"overall": {...}, "imgToEval": {id: {"caption": [{"caption": ...}], ...}}}``
      (e.g. COCO-CN's published ``result_seqlearn.txt``).
    """
    path = Path(path)
    data = load_json(path, CaptionDataError)
    preds: dict[str, str] = {}
    if isinstance(data, dict) and isinstance(data.get("imgToEval"), dict):
        for key, ev in data["imgToEval"].items():
            where = f"{path}: imgToEval[{key!r}]"
            try:
                cap = ev["caption"][0]["caption"]
            except (KeyError, IndexError, TypeError):
                raise CaptionDataError(f"{where}: expected 'caption': [{{'caption': ...}}]") from None
            preds[str(key)] = _check_caption(cap, where, "caption")
    elif isinstance(data, list):
        for i, item in enumerate(data):
            where = f"{path}: item {i}"
            if not isinstance(item, dict) or "image_id" not in item:
                raise CaptionDataError(f"{where}: expected an object with 'image_id' and 'caption'")
            key = str(item["image_id"])
            if key in preds:
                raise CaptionDataError(f"{where}: duplicate image_id {key!r}")
            preds[key] = _check_caption(item.get("caption"), where, "caption")
    else:
        raise CaptionDataError(f"{path}: neither a coco-caption results list nor an evaluation dump with 'imgToEval'")
    return preds


def read_coco_eval_overall(path: str | Path) -> dict[str, float]:
    """The ``overall`` block of a coco-caption evaluation dump, renamed to our keys, 0-100 scale."""
    path = Path(path)
    data = load_json(path, CaptionDataError)
    if not isinstance(data, dict) or not isinstance(data.get("overall"), dict):
        raise CaptionDataError(f"{path}: no 'overall' block")
    names = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
             "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr"}
    return {names[k]: 100.0 * float(v) for k, v in data["overall"].items() if k in names}


# ----------------------------------------------------------------------------- METEOR


def meteor_jar_path() -> Path:
    """meteor-1.5.jar as shipped inside pycocoevalcap."""
    from pycocoevalcap.meteor import meteor  # a namespace package: locate the jar via this module

    return Path(meteor.__file__).resolve().parent / "meteor-1.5.jar"


class MeteorError(RuntimeError):
    pass


class MeteorJar:
    """One METEOR 1.5 process in ``-stdio`` mode for one scoring call; use as a context manager.

    Exact matching only (``-m exact``), English parameters and ``-norm`` as coco-caption. Lines are
    written and read one at a time so neither pipe can fill up; stderr goes to a temporary file
    (not a pipe) so a chatty JVM cannot block us.
    """

    def __init__(self, jar: str | Path | None = None, java: str | None = None, memory: str = "1G") -> None:
        java = java or shutil.which("java")
        if not java:
            raise MeteorError("java not found on PATH (METEOR 1.5 needs a Java runtime, 8 or newer)")
        self.jar = Path(jar) if jar else meteor_jar_path()
        if not self.jar.is_file():
            raise MeteorError(f"METEOR jar not found at {self.jar}")
        self.cmd = [java, f"-Xmx{memory}", "-jar", str(self.jar), "-", "-", "-stdio",
                    "-l", "en", "-norm", "-m", "exact"]
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, cwd=str(self.jar.parent), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr)

    def __enter__(self) -> "MeteorJar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace").strip()[-500:]

    def _ask(self, line: str) -> str:
        try:
            self.proc.stdin.write((line + "\n").encode("utf-8"))
            self.proc.stdin.flush()
            out = self.proc.stdout.readline().decode("utf-8").strip()
        except (BrokenPipeError, OSError) as exc:
            raise MeteorError(f"METEOR process failed ({exc}): {self._stderr_tail()}") from None
        if not out:
            raise MeteorError(f"METEOR process returned nothing (exit code {self.proc.poll()}): {self._stderr_tail()}")
        return out

    @staticmethod
    def _clean(text: str) -> str:
        # '|||' separates fields in the stdio protocol.
        return " ".join(text.replace("|||", " ").split())

    def score(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
        """Corpus METEOR and per-item scores for space-separated hypotheses/references."""
        stats = []
        for hyp, rs in zip(hyps, refs):
            fields = ["SCORE", *(self._clean(r) for r in rs), self._clean(hyp)]
            stats.append(self._ask(" ||| ".join(fields)))
        self.proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode("utf-8"))
        self.proc.stdin.flush()
        try:
            items = [float(self.proc.stdout.readline()) for _ in stats]
            total = float(self.proc.stdout.readline())
        except ValueError:
            raise MeteorError(f"unexpected METEOR output: {self._stderr_tail()}") from None
        return total, items

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stdin):
            if stream and not stream.closed:
                stream.close()
        self._stderr.close()


# ----------------------------------------------------------------------------- scoring


def check_ids(preds: Mapping[str, Any], refs: Mapping[str, Any], pred_name: str = "predictions",
              ref_name: str = "references") -> None:
    """Raise CaptionDataError when the id sets differ, naming both sources and example ids."""
    missing = [k for k in refs if k not in preds]
    extra = [k for k in preds if k not in refs]
    problems = []
    if missing:
        problems.append(f"{len(missing)} id(s) of {ref_name} have no prediction in {pred_name}, e.g. {missing[:5]}")
    if extra:
        problems.append(f"{len(extra)} id(s) of {pred_name} are not in {ref_name}, e.g. {extra[:5]}")
    if problems:
        raise CaptionDataError("; ".join(problems))


def score_captions(
    preds: Mapping[Any, str],
    refs: Mapping[Any, Sequence[str]],
    tokenization: str = "char",
    metrics: Sequence[str] = METRICS,
    pred_name: str = "predictions",
    ref_name: str = "references",
) -> dict[str, Any]:
    """Score one caption per id against its references; scores on the paper's 0-100 scale.

    Returns ``BLEU-1..4``, ``METEOR`` (None plus ``METEOR_error`` when it cannot run), ``ROUGE-L``,
    ``CIDEr`` (the metrics asked for), ``count`` (items scored) and ``tokenization``.
    Raises CaptionDataError for differing id sets or captions with nothing left to score.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose from {METRICS}")
    preds = {str(k): v for k, v in preds.items()}
    refs = {str(k): list(v) for k, v in refs.items()}
    check_ids(preds, refs, pred_name, ref_name)
    if not refs:
        raise CaptionDataError("nothing to score: no ids")

    ids = sorted(refs)
    res: dict[str, list[str]] = {}
    gts: dict[str, list[str]] = {}
    for k in ids:
        hyp = tokenize(preds[k], tokenization)
        if not hyp:
            raise CaptionDataError(f"{pred_name}: caption of id {k!r} is empty after {tokenization} tokenization")
        if not refs[k]:
            raise CaptionDataError(f"{ref_name}: id {k!r} has no references")
        toks = [tokenize(r, tokenization) for r in refs[k]]
        for i, t in enumerate(toks):
            if not t:
                raise CaptionDataError(f"{ref_name}: reference {i} of id {k!r} is empty after {tokenization} tokenization")
        # pycocoevalcap splits on single spaces.
        res[k] = [" ".join(hyp)]
        gts[k] = [" ".join(t) for t in toks]

    out: dict[str, Any] = {}
    if "BLEU" in metrics:
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"BLEU-{n + 1}": 100.0 * b for n, b in enumerate(bleu)})
    if "METEOR" in metrics:
        try:
            with MeteorJar() as meteor:
                out["METEOR"] = 100.0 * meteor.score([res[k][0] for k in ids], [gts[k] for k in ids])[0]
        except MeteorError as exc:
            log.warning("METEOR not computed: %s", exc)
            out["METEOR"] = None
            out["METEOR_error"] = str(exc)
    if "ROUGE-L" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        out["ROUGE-L"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in metrics:
        from pycocoevalcap.cider.cider import Cider  # CIDEr-D (sigma 6, clipped counts)

        out["CIDEr"] = 100.0 * float(Cider().compute_score(gts, res)[0])
    out["count"] = len(ids)
    out["tokenization"] = tokenization
    return out


def evaluate_caption_files(pred: str | Path, ref: str | Path, tokenization: str = "char",
                           metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """The eval_caption tool: read a PRED and a REF JSONL file and score them."""
    return score_captions(read_pred_jsonl(pred), read_ref_jsonl(ref), tokenization, metrics,
                          pred_name=str(pred), ref_name=str(ref))
