"""The token explorer's data: which documents and tokens it keeps, the p-values it joins, the binary
arrays of its per-run scripts (decoded here with numpy), the page's embedded JSON, and the size of an
OLMoE-sized report."""

import base64
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from routelab.io.files import write_json, write_parquet
from routelab.report.explorer import (
    MISSING_PVALUE,
    collect_explorer,
    explorer_documents,
    pvalue_codes,
    write_explorer_files,
)
from routelab.report.page import embed_json, render_html
from routelab.report.tokens import load_decoder, token_pieces
from tests.support.report_runs import (
    BH,
    LAYER1_PVALUES,
    TOPK,
    explorer_log,
    fake_decode,
    routing_log,
    summary,
)


def run_dir(tmp_path: Path, routing=BH, doc_ids=(7, 3, 1), pvalue_positions=(0, 1, 2)) -> Path:
    name, method, params, min_k, max_k = routing
    path = tmp_path / "runs" / name / "wiki"
    write_json(path / "summary.json", summary(name, "wiki", method, params, min_k, max_k))
    write_parquet(path / "routing.parquet", routing_log(method, list(doc_ids)))
    if method == "bh":
        write_parquet(path / "explorer.parquet", explorer_log(params["alpha"], [1, 3], positions=pvalue_positions))
    return path


def test_explorer_keeps_the_first_documents_and_caps_their_tokens(tmp_path):
    rows = explorer_documents(run_dir(tmp_path, TOPK), documents=2, decode=fake_decode, max_tokens=2)
    assert sorted(rows["doc_id"].unique()) == [1, 3]  # the two smallest doc_ids, not the first written
    assert rows["position"].unique().tolist() == [0, 1] and (rows["document_tokens"] == 3).all()
    doc = rows[rows["doc_id"] == 3]
    # routing_log (top-k): layer 0 routes position p to [p % 4], layer 1 routes 0 -> [0, 1], 1 -> [1, 2]
    assert [list(e) for e in doc["experts"]] == [[0], [0, 1], [1], [1, 2]]
    assert doc["text"].tolist() == ["<script>", "<script>", "alert(1)", "alert(1)"]
    assert doc["pvalues"].isna().all() and doc["alpha"].isna().all()


def test_explorer_cap_follows_windows_and_positions_whatever_the_row_order(tmp_path):
    # one document over windows 3 and 4 (3 tokens each), every row of both logs written in reverse order
    path = run_dir(tmp_path)
    logs = {"routing.parquet": routing_log("bh", [3, 4]), "explorer.parquet": explorer_log(0.05, [3, 4])}
    for name, table in logs.items():
        table = table.set_column(table.schema.get_field_index("doc_id"), "doc_id",
                                 pa.array(np.full(table.num_rows, 3), pa.int32()))
        write_parquet(path / name, table.take(np.arange(table.num_rows)[::-1]))
    rows = explorer_documents(path, documents=1, decode=None, max_tokens=4)
    tokens = rows.drop_duplicates(["window_id", "position"])
    assert list(zip(tokens["window_id"], tokens["position"])) == [(3, 0), (3, 1), (3, 2), (4, 0)]
    assert (rows["document_tokens"] == 6).all() and rows["layer"].tolist() == [0, 1] * 4
    last = rows[(rows["window_id"] == 4) & (rows["layer"] == 1)]
    assert list(last["pvalues"].iloc[0]) == pytest.approx(LAYER1_PVALUES[0])


def test_explorer_joins_pvalues_where_recorded(tmp_path):
    # explorer.parquet holds positions 0 and 2 only (like decisions.parquet's sample)
    rows = explorer_documents(run_dir(tmp_path, pvalue_positions=(0, 2)), documents=2, decode=None)
    layer1 = rows[(rows["doc_id"] == 1) & (rows["layer"] == 1)]
    assert list(layer1["pvalues"].iloc[0]) == pytest.approx(LAYER1_PVALUES[0])
    assert layer1["pvalues"].iloc[1] is None or np.all(pd.isna(layer1["pvalues"].iloc[1]))
    assert list(layer1["pvalues"].iloc[2]) == pytest.approx(LAYER1_PVALUES[2])
    assert layer1["passing_rank"].tolist()[::2] == [2, 1]
    assert layer1["alpha"].dropna().tolist() == pytest.approx([0.05, 0.05])
    assert layer1["text"].tolist() == ["[5]", "[6]", "[7]"]  # no decoder: the ids


def test_explorer_rejects_a_bad_cap(tmp_path):
    with pytest.raises(ValueError, match="explorer_tokens: 0 is not valid"):
        explorer_documents(run_dir(tmp_path, TOPK), documents=1, decode=None, max_tokens=0)
    with pytest.raises(ValueError, match="explorer_documents: -1"):
        explorer_documents(run_dir(tmp_path, TOPK), documents=-1, decode=None)


def test_pvalue_codes_are_thousandths_of_a_decade():
    codes = pvalue_codes(np.array([1.0, 0.01, 0.004, 1e-70, np.nan]))
    # -1000 log10(0.004) = 2397.94
    assert codes.tolist() == [0, 2000, 2398, 65000, MISSING_PVALUE]


def load_script(path: Path) -> dict:
    text = path.read_text()
    return json.loads(text[text.index("= {") + 2:text.rindex(";")])


def array(b64: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype=dtype)


def test_explorer_scripts_hold_each_runs_documents_as_binary_arrays(tmp_path):
    table = collect_explorer([run_dir(tmp_path, TOPK), run_dir(tmp_path, BH)], 2, fake_decode)
    index = write_explorer_files(table, tmp_path / "report")
    assert [(e["id"], e["routing"], e["file"], e["has_pvalues"]) for e in index] == [
        (0, "bh_a0.05_k8", "explorer/0.js", True), (1, "topk8", "explorer/1.js", False)]
    assert index[0]["documents"] == [{"doc_id": 1, "tokens": 3, "tokens_total": 3},
                                     {"doc_id": 3, "tokens": 3, "tokens_total": 3}]
    script = (tmp_path / "report" / "explorer" / "0.js").read_text()
    assert script.startswith("window.routelabExplorer = window.routelabExplorer || {};\nwindow.routelabExplorer[0] = ")
    bh = load_script(tmp_path / "report" / "explorer" / "0.js")
    assert (bh["layers"], bh["num_experts"], bh["alpha"]) == ([0, 1], 4, pytest.approx(0.05))
    doc = bh["documents"][0]
    assert doc["text"] == ["<script>", "alert(1)", "</script>"] and doc["generated"] == [0, 0, 0]
    # (token, layer) cells token-major: BH routing_log routes layer 1 to [0, 1], [1], [3]
    assert array(doc["k"], "u1").tolist() == [1, 2, 1, 1, 1, 1]
    assert array(doc["experts"], "u1").tolist() == [0, 0, 1, 1, 1, 2, 3]
    assert array(doc["weights"], "<f2").tolist() == [1, 0.5, 0.5, 1, 1, 1, 1]
    pvalues = 10.0 ** (-array(doc["pvalues"], "<u2").astype(float).reshape(6, 4) / 1000)
    np.testing.assert_allclose(pvalues[1::2], LAYER1_PVALUES, rtol=1.2e-3)  # half a code: 10^0.0005 - 1
    np.testing.assert_allclose(pvalues[0], [0.01, 0.5, 0.5, 0.5], rtol=1.2e-3)
    assert doc["passing_rank"] == [1, 2, 1, 1, 1, 1]
    topk = load_script(tmp_path / "report" / "explorer" / "1.js")
    assert topk["alpha"] is None and topk["documents"][0]["pvalues"] is None
    np.testing.assert_allclose(array(topk["documents"][0]["weights"], "<f2")[-3:], [1 / 3] * 3, rtol=1e-3)

    # a rerun with fewer runs leaves no stale script behind
    write_explorer_files(table[table["routing"] == "topk8"], tmp_path / "report")
    assert sorted(p.name for p in (tmp_path / "report" / "explorer").iterdir()) == ["0.js"]


def test_embedded_json_cannot_end_its_script_element():
    data = {"text": "</script><!-- & <b>", "n": 1.5}
    text = embed_json(data)
    assert "</" not in text and "<!--" not in text and "<" not in text
    assert json.loads(text) == data


def test_token_pieces_rejoin_multibyte_characters_and_keep_leading_spaces():
    # a byte-level decoder: each id is one byte of UTF-8
    data = " a é中".encode()

    def byte_decode(ids):
        return bytes(data[i] for i in ids).decode("utf-8", errors="replace")

    pieces = token_pieces(list(range(len(data))), byte_decode)
    assert pieces == [" ", "a", " ", "", "é", "", "", "中"]

    # a sentencepiece-like decoder drops the first token's leading space: the context keeps it
    words = ["▁the", "▁cat", "s"]

    def sp_decode(ids):
        return "".join(words[i] for i in ids).replace("▁", " ").lstrip(" ")

    assert token_pieces([0, 1, 2], sp_decode) == ["the", " cat", "s"]


def test_load_decoder_reads_a_saved_tokenizer(tmp_path):
    from routelab.demo.model import train_tokenizer

    tokenizer = train_tokenizer(["the cat sat on the mat", "a dog"] * 20, vocab_size=300)
    tokenizer.save_pretrained(tmp_path)
    decode = load_decoder(tmp_path)
    ids = tokenizer.encode("the cat é<|endoftext|>")
    pieces = decode(ids)
    assert len(pieces) == len(ids) and "".join(pieces) == "the cat é<|endoftext|>"
    assert pieces[-1] == "<|endoftext|>" and " cat" in pieces


def olmoe_explorer(configs=20, datasets=3, documents=3, tokens=128, layers=16, experts=64, k=8) -> pd.DataFrame:
    """Explorer rows of OLMoE-sized runs, every second config with p-values (the larger scripts)."""
    rng = np.random.default_rng(0)
    cells = documents * tokens * layers
    token = np.repeat(np.arange(documents * tokens), layers)
    base = pd.DataFrame({
        "num_experts": experts, "doc_id": token // tokens, "window_id": token // tokens, "position": token % tokens,
        "token_id": token % 500, "phase": "prefill", "layer": np.tile(np.arange(layers), documents * tokens), "k": k,
        "experts": [rng.choice(experts, k, replace=False) for _ in range(cells)],
        "weights": list(rng.random((cells, k)).astype(np.float32)), "document_tokens": 4 * tokens,
        "text": [" word"] * cells})
    with_pvalues = base.assign(pvalues=list(rng.random((cells, experts)).astype(np.float32) ** 3),
                               passing_rank=3, alpha=0.05)
    without = base.assign(pvalues=None, passing_rank=np.nan, alpha=np.nan)
    return pd.concat([(with_pvalues if c % 2 else without).assign(routing=f"config{c:02d}", dataset=f"data{d}")
                      for c in range(configs) for d in range(datasets)], ignore_index=True)


def test_an_olmoe_sized_report_stays_within_its_size_caps(tmp_path):
    index = write_explorer_files(olmoe_explorer(), tmp_path)
    sizes = {path.name: path.stat().st_size for path in (tmp_path / "explorer").iterdir()}
    assert len(sizes) == 60
    # a run with p-values: 384 tokens x 16 layers x (64 p-values x 2 bytes + 8 x 3 bytes + 1), base64
    per_run = math.ceil(384 * 16 * (64 * 2) / 3) * 4 + math.ceil(384 * 16 * 8 * 2 / 3) * 4
    assert max(sizes.values()) == pytest.approx(per_run, rel=0.1) and max(sizes.values()) < 1.5e6
    display = pd.DataFrame({"routing": [e["routing"] for e in index], "dataset": [e["dataset"] for e in index],
                            "quality [CI]": ["3.1 [3.0, 3.2]"] * 60})
    points = [{"routing": e["routing"], "dataset": e["dataset"], "method": "bh", "params": "alpha=0.05",
               "metric": "perplexity", "higher": False, "quality": 3.1, "low": 3.0, "high": 3.2,
               "experts_mean": 4.0, "flops": 1e8, "flops_vs_baseline": 0.5, "baseline": False} for e in index]
    page = render_html(display, "olmoe", "config00", [], [], "methods", tmp_path, tmp_path / "figures",
                       interactive={"baseline": "config00", "explorer": index,
                                    "plot": {"x_label": "FLOPs", "points": points}})
    assert len(page.encode()) < 10e6 and len(page.encode()) < 200e3  # the explorer's data is not in the page
