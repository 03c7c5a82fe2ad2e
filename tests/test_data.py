import hashlib
import json

import pytest

from utils import data
from utils.data import load_jsonl


def test_python_docs_is_the_language_reference():
    docs = data.python_docs()
    assert len(docs) > 50
    assert sum(len(t) for t in docs.values()) > 300_000
    assert "assert" in docs and "assert" in docs["assert"].lower()


def test_shakespeare_modern_spelling_complete_works():
    works = data.shakespeare()
    assert {"hamlet", "macbeth", "sonnets", "tempest"} <= set(works)
    assert len(works) >= 38
    assert not any(name.endswith("_f") for name in works)
    assert "To be, or not to be" in works["hamlet"]
    assert sum(map(len, works.values())) > 4_000_000


def test_shakespeare_folio_and_bad_spelling():
    assert "hamlet" in data.shakespeare("folio")
    with pytest.raises(ValueError, match="'modern' or 'folio'"):
        data.shakespeare("old")


def test_every_data_file_is_checksummed_and_matches():
    sums = data._read_checksums()
    files = {p.relative_to(data.DATA_DIR).as_posix() for p in data.DATA_DIR.rglob("*")
             if p.is_file() and p != data.CHECKSUMS_FILE}
    assert files == set(sums), "run: python -m utils.data --update-checksums"
    for name in sums:
        data.data_path(name)  # raises on a mismatch


def test_tampered_data_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"a": 1}) + "\n")
    digest = hashlib.sha256((tmp_path / "rows.jsonl").read_bytes()).hexdigest()
    (tmp_path / "SHA256SUMS").write_text(f"{digest}  rows.jsonl\n")
    monkeypatch.setattr(data, "DATA_DIR", tmp_path)
    monkeypatch.setattr(data, "CHECKSUMS_FILE", tmp_path / "SHA256SUMS")
    assert data.load_jsonl("rows.jsonl") == [{"a": 1}]
    (tmp_path / "rows.jsonl").write_text(json.dumps({"a": 2}) + "\n")
    with pytest.raises(ValueError, match="update-checksums"):
        data.load_jsonl("rows.jsonl")
    with pytest.raises(ValueError, match="not a course data file"):
        data.load_jsonl("nope.jsonl")


def test_every_handbook_answer_is_matched_by_its_own_aliases():
    """A reply that states the gold answer in its own words must score as correct (whole-word matching)."""
    from utils.answers import mentions_any

    for q in load_jsonl("09_handbook_questions.jsonl"):
        if q["answerable"] and not q["answer"].isdigit():  # bare numbers need their unit ("3 days")
            assert mentions_any(q["answer"], q["aliases"]), q["id"]


def test_numeric_handbook_aliases_point_only_at_their_own_section():
    """An alias with a digit that also matches another section would credit a copied wrong passage.

    Whole-word matching still finds "16" in "16:00" (":" is not a word character), so such an alias
    needs its unit ("16 characters"). The one allowed repeat is a phrase with the same unit and meaning.
    """
    from utils.answers import mentions_any
    from utils.chunking import split_sections

    sections = dict(split_sections(data.load_text("09_handbook.md")))
    same_phrase_elsewhere = {("hb26", "10 working days"), ("hb26", "10 days")}  # onboarding: also 10 working days
    for q in load_jsonl("09_handbook_questions.jsonl"):
        for alias in q["aliases"]:
            if not any(c.isdigit() for c in alias) or (q["id"], alias) in same_phrase_elsewhere:
                continue
            others = [name for name, text in sections.items() if name != q["source"] and mentions_any(text, [alias])]
            assert not others, f"{q['id']}: alias {alias!r} also matches {others}"


def test_arithmetic_problems_use_the_singular_for_one():
    assert not any(" 1 cards" in p["question"] for p in load_jsonl("07_arithmetic.jsonl"))
