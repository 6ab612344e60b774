"""Build the bundled calibration/ and eval/ text sets (deterministic).

Inputs (nothing is fetched at run time of inf-quant; this script runs once, offline, by a maintainer):
  --raw   the prototype EN/ZH/code/math mix in ../shared/corpora (prototype-calib.jsonl, prototype-eval.jsonl),
          extracted from Debian and PyPI packages by shared/corpora/build_mix.py (sources in calibration/PROVENANCE.md)
  --debs  a folder with Debian's libreoffice-help-zh-cn .deb unpacked under x/ (`apt-get download
          libreoffice-help-zh-cn && dpkg -x libreoffice-help-zh-cn_*.deb x/`), used to top up Chinese so that
          Chinese is >= 30 % of the calibration tokens.

Rules: GSM8K's *test* split (a benchmark) is dropped from both sets; eval documents never appear in calibration;
records are sorted by (source, doc) and written with sorted keys, so the output bytes depend only on the inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import html.parser
import json
import re
from pathlib import Path

HAN = re.compile(r"[\u4e00-\u9fff]")
DROP_SOURCES = {"gsm8k-test"}  # benchmark test split: never calibrate or evaluate on it
LO_SOURCE = "libreoffice-help-zh"
LO_LICENSE = "MPL-2.0"


class _Text(html.parser.HTMLParser):
    SKIP = {"script", "style", "head", "nav"}
    BLOCK = {"p", "div", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "tr", "br", "dt", "dd", "table"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in self.SKIP
        if tag in self.BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        if tag in self.BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.out.append(re.sub(r"\s+", " ", data))


def html_to_text(path: Path) -> str:
    p = _Text()
    p.feed(path.read_text(encoding="utf-8", errors="replace"))
    text = re.sub(r"[ \t]+\n", "\n", "".join(p.out))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def paragraphs(text: str, min_len: int) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) >= min_len]


def libreoffice_docs(root: Path):
    """(doc_id, [Chinese paragraphs]) per 12 consecutive help pages; ids as in shared/corpora/build_mix.py."""
    base = root / "x/usr/share/libreoffice/help/zh-CN"
    files = sorted(base.rglob("*.html"))
    for i in range(0, len(files), 12):
        ps = [p for f in files[i : i + 12] for p in paragraphs(html_to_text(f), 20)]
        ps = [p for p in ps if len(HAN.findall(p)) > 0.3 * len(p)]
        if ps:
            yield f"{files[i].parent.relative_to(base)}#{i // 12}", ps


def chunk(doc_id: str, ps: list[str], budget: int) -> list[tuple[str, str]]:
    out, cur = [], ""
    for p in ps:
        if cur and len(cur) + len(p) + 2 > budget:
            out.append((doc_id, cur))
            cur = ""
        cur = f"{cur}\n\n{p}" if cur else p[:budget]
    if len(cur) > budget // 4:
        out.append((doc_id, cur))
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    rows = sorted(rows, key=lambda r: (r["source"], r["doc"], r["text"]))
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, default=Path(__file__).resolve().parents[2] / "shared/corpora")
    ap.add_argument("--debs", type=Path, required=True)
    ap.add_argument("--topup-calib", type=int, default=70, help="extra LibreOffice zh-CN chunks for calibration")
    ap.add_argument("--topup-eval", type=int, default=10, help="extra LibreOffice zh-CN chunks for eval")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1])
    args = ap.parse_args()

    calib = [r for r in read_jsonl(args.raw / "prototype-calib.jsonl") if r["source"] not in DROP_SOURCES]
    evals = [r for r in read_jsonl(args.raw / "prototype-eval.jsonl") if r["source"] not in DROP_SOURCES]
    used = {r["doc"] for r in calib + evals if r["source"] == LO_SOURCE}
    fresh = [(d, ps) for d, ps in libreoffice_docs(args.debs) if d not in used]
    # Deterministic split of the unused documents: every 5th document to eval, the rest to calibration.
    ev_docs = {d for k, (d, _) in enumerate(fresh) if k % 5 == 4}
    chunks = [c for d, ps in fresh for c in chunk(d, ps, 2200)]
    add_c = [c for c in chunks if c[0] not in ev_docs][: args.topup_calib]
    add_e = [c for c in chunks if c[0] in ev_docs][: args.topup_eval]
    for dst, items in ((calib, add_c), (evals, add_e)):
        dst += [{"text": t, "source": LO_SOURCE, "doc": d, "lang": "zh", "license": LO_LICENSE} for d, t in items]
    assert not {r["doc"] for r in calib} & {r["doc"] for r in evals}, "eval and calibration documents overlap"

    manifest = {}
    for name, rows, sub in (("calibration", calib, "calib.jsonl"), ("eval", evals, "eval.jsonl")):
        (args.out / name).mkdir(parents=True, exist_ok=True)
        sha = write_jsonl(args.out / name / sub, rows)
        by = {}
        for r in rows:
            s = by.setdefault(r["source"], {"records": 0, "chars": 0, "lang": r["lang"], "license": r["license"]})
            s["records"] += 1
            s["chars"] += len(r["text"])
        manifest[name] = {"file": f"{name}/{sub}", "sha256": sha, "records": len(rows), "sources": by}
        print(f"{name}: {len(rows)} records, {(args.out / name / sub).stat().st_size} bytes, sha256 {sha[:16]}")
    (args.out / "calibration" / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
