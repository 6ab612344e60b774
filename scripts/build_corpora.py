"""Build the bundled calibration/ and eval/ text sets (deterministic).

Inputs (nothing is fetched at run time of inf-quant; this script runs once, offline, by a maintainer):
  --raw   the prototype EN/ZH/code/math mix in ../shared/corpora (prototype-calib.jsonl, prototype-eval.jsonl),
          extracted from Debian and PyPI packages by shared/corpora/build_mix.py (sources in calibration/PROVENANCE.md)
  --debs  a folder with Debian's libreoffice-help-zh-cn and python3.11-doc .debs unpacked under x/ (`apt-get download
          libreoffice-help-zh-cn python3.11-doc && for f in *.deb; do dpkg -x $f x/; done`). LibreOffice's zh-CN
          help tops up Chinese so that Chinese is >= 30 % of the calibration tokens; both packages give the chat
          portion calibration/chat.jsonl: conversations whose user turns are a section heading put as a question
          (our fixed templates, CHAT_Q) and whose assistant turns are that section's own paragraphs, taken from
          documents that neither calib.jsonl nor eval.jsonl uses.

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
PY_SOURCE, PY_LICENSE = "python-docs", "PSF-2.0"
PY_SKIP = ("whatsnew", "c-api", "distutils")  # as in shared/corpora/build_mix.py
HEADING = "\x01"  # marks a heading paragraph in html_to_text(mark_headings=True)
# The chat portion's user turns (the only text we wrote): {t} = page title, {h} = section heading
CHAT_Q = {
    "en": ("Tell me about “{t}”.", "In “{t}”, what is “{h}” about?",
           ("What about “{h}”?", "And “{h}”?", "Explain “{h}”, please.")),
    "zh": ("请介绍一下“{t}”。", "在“{t}”中，“{h}”是什么？", ("那么“{h}”呢？", "再讲讲“{h}”。", "“{h}”是怎么回事？")),
}
CHAT_TURNS = 4       # question/answer pairs per conversation at most
CHAT_PER_PAGE = 2    # conversations per upstream page at most, so the portion spreads over many pages
RST_RULE = re.compile(r"([=\-~^*#\"'+`])\1{2,}\s*$")
RST_SKIP = re.compile(r"\.\. (index|module|currentmodule|moduleauthor|sectionauthor|highlight|toctree|_)")


class _Text(html.parser.HTMLParser):
    SKIP = {"script", "style", "head", "nav"}
    BLOCK = {"p", "div", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "tr", "br", "dt", "dd", "table"}

    def __init__(self, mark_headings: bool = False):
        super().__init__(convert_charrefs=True)
        self.out, self.skip, self.mark = [], 0, mark_headings

    def handle_starttag(self, tag, attrs):
        self.skip += tag in self.SKIP
        if tag in self.BLOCK:
            self.out.append("\n")
        if self.mark and tag in ("h1", "h2", "h3"):
            self.out.append(HEADING)

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        if tag in self.BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.out.append(re.sub(r"\s+", " ", data))


def html_to_text(path: Path, mark_headings: bool = False) -> str:
    p = _Text(mark_headings)
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


def rst_plain(heading: str) -> str:
    """A reST heading without role markup: ':mod:`zipapp` --- Manage ...' -> 'zipapp --- Manage ...'."""
    return re.sub(r":[\w:.-]+:`~?([^`<]*?)\s*(<[^>]*>)?`", r"\1", heading).replace("``", "").replace("**", "").strip()


def rst_sections(text: str) -> list[tuple[str, list[str]]]:
    """(heading, paragraphs >= 40 chars) per section of one .rst.txt file; the first heading is the title."""
    lines, out, head, body = text.splitlines(), [], "", []
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and not line[0].isspace() and RST_RULE.match(nxt) and len(nxt.rstrip()) >= len(line.rstrip()):
            out.append((head, body))
            head, body, i = rst_plain(line), [], i + 2
            continue
        body.append(line)
        i += 1
    out.append((head, body))
    keep = lambda p: not RST_SKIP.match(p) and not RST_RULE.match(p)  # noqa: E731
    return [(h, [p for p in paragraphs("\n".join(b), 40) if keep(p)]) for h, b in out if h]


def html_sections(path: Path) -> list[tuple[str, list[str]]]:
    """(heading, Chinese paragraphs) per h1-h3 section of one LibreOffice help page (rules as libreoffice_docs)."""
    out = []
    for p in paragraphs(html_to_text(path, mark_headings=True), 1):
        if p.startswith(HEADING):
            out.append((p[1:].strip(), []))
        elif out and len(p) >= 20 and len(HAN.findall(p)) > 0.3 * len(p):
            out[-1][1].append(p)
    return [(h, ps) for h, ps in out if HAN.search(h)]


def conversations(sections: list[tuple[str, list[str]]], lang: str, budget: int) -> list[list[dict]]:
    """Chat conversations of one page: user = a heading as a question (CHAT_Q), assistant = its paragraphs
    packed up to `budget` chars (as chunk() packs); CHAT_TURNS pairs per conversation, CHAT_PER_PAGE at most."""
    first, first_sub, follow = CHAT_Q[lang]
    title = sections[0][0] if sections else ""
    pairs = [(h, chunk(h, ps, budget)[0][1]) for h, ps in sections if chunk(h, ps, budget)]
    convs = []
    for c in range(0, min(len(pairs), CHAT_TURNS * CHAT_PER_PAGE), CHAT_TURNS):
        msgs = []
        for k, (h, answer) in enumerate(pairs[c: c + CHAT_TURNS]):
            q = (first if h == title else first_sub) if k == 0 else follow[(c + k) % len(follow)]
            msgs += [{"role": "user", "content": q.format(t=title, h=h)}, {"role": "assistant", "content": answer}]
        convs.append(msgs)
    return convs


def spread(cands: list[dict], budget: int) -> list[dict]:
    """About `budget` chars of records, taken evenly spaced from the whole (sorted) candidate list."""
    size = lambda r: sum(len(m["content"]) for m in r["messages"])  # noqa: E731
    stride = max(1, sum(map(size, cands)) // budget)
    out, n = [], 0
    for r in cands[::stride]:
        if n >= budget:
            break
        out.append(r)
        n += size(r)
    return out


def chat_records(debs: Path, used: set[tuple[str, str]], lo_groups: set[str], en_chars: int, zh_chars: int):
    """The chat portion: Python docs pages (EN) and LibreOffice zh-CN help pages (ZH) of no calib/eval document.

    used: (source, doc) pairs of calib.jsonl and eval.jsonl; lo_groups: the LibreOffice document ids reserved
    for eval, which stay out as well."""
    base = debs / "x/usr/share/doc/python3.11/html/_sources"
    en = []
    for f in sorted(base.rglob("*.rst.txt")):
        doc = str(f.relative_to(base))
        if f.parts[-2] in PY_SKIP or (PY_SOURCE, doc) in used:
            continue
        for msgs in conversations(rst_sections(f.read_text(encoding="utf-8")), "en", 1500):
            en.append({"messages": msgs, "source": PY_SOURCE, "doc": doc, "lang": "en", "license": PY_LICENSE})
    base = debs / "x/usr/share/libreoffice/help/zh-CN"
    files, zh = sorted(base.rglob("*.html")), []
    for i, f in enumerate(files):  # document ids as in libreoffice_docs: 12 consecutive pages per document
        doc = f"{files[i - i % 12].parent.relative_to(base)}#{i // 12}"
        if (LO_SOURCE, doc) in used or doc in lo_groups:
            continue
        for msgs in conversations(html_sections(f), "zh", 600):
            zh.append({"messages": msgs, "source": LO_SOURCE, "doc": doc, "lang": "zh", "license": LO_LICENSE})
    return spread(en, en_chars) + spread(zh, zh_chars)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    key = lambda r: (r["source"], r["doc"], r.get("text") or json.dumps(r["messages"], ensure_ascii=False))  # noqa
    rows = sorted(rows, key=key)
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, default=Path(__file__).resolve().parents[2] / "shared/corpora")
    ap.add_argument("--debs", type=Path, required=True)
    ap.add_argument("--topup-calib", type=int, default=70, help="extra LibreOffice zh-CN chunks for calibration")
    ap.add_argument("--topup-eval", type=int, default=10, help="extra LibreOffice zh-CN chunks for eval")
    ap.add_argument("--chat-en-chars", type=int, default=150_000, help="chat portion: Python docs message chars")
    ap.add_argument("--chat-zh-chars", type=int, default=70_000, help="chat portion: LibreOffice zh message chars")
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
    pairs = {(r["source"], r["doc"]) for r in calib + evals}
    chat = chat_records(args.debs, pairs, ev_docs, args.chat_en_chars, args.chat_zh_chars)
    assert not {(r["source"], r["doc"]) for r in chat} & pairs, "chat documents overlap calibration or eval"

    manifest, data = {}, {}
    for name, rows, sub in (("calibration", calib, "calibration/calib.jsonl"), ("eval", evals, "eval/eval.jsonl"),
                            ("chat", chat, "calibration/chat.jsonl")):
        (args.out / sub).parent.mkdir(parents=True, exist_ok=True)
        sha = write_jsonl(args.out / sub, rows)
        data[sub] = (args.out / sub).read_bytes()
        by = {}
        for r in rows:
            s = by.setdefault(r["source"], {"records": 0, "chars": 0, "lang": r["lang"], "license": r["license"]})
            s["records"] += 1
            s["chars"] += len(r["text"]) if "text" in r else sum(len(m["content"]) for m in r["messages"])
        manifest[name] = {"file": sub, "sha256": sha, "records": len(rows), "sources": by}
        print(f"{name}: {len(rows)} records, {len(data[sub])} bytes, sha256 {sha[:16]}")
    # calibration.sha256 of each bundled mix (inf_quant.data.calibrate.MIXES): its files' bytes one after another
    mixes = {"bundled": ["calibration/calib.jsonl"], "bundled-chat": ["calibration/chat.jsonl"],
             "bundled-mix": ["calibration/calib.jsonl", "calibration/chat.jsonl"]}
    manifest["mixes"] = {k: hashlib.sha256(b"".join(data[f] for f in fs)).hexdigest() for k, fs in mixes.items()}
    (args.out / "calibration" / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
