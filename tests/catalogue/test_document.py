"""`document.convert` with real LibreOffice, on documents the test writes itself.

The path-safety tests never skip; the conversions skip (saying why) where soffice is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import zipfile
from pathlib import Path

import pytest

from jobyard.job_engine import env
from jobyard.job_engine.errors import InvalidPayloadError, MissingSettingError, PermanentError
from jobyard.job_engine.inline import run_inline
from jobyard.job_engine.jobs import document
from jobyard.job_engine.registry import get_spec

SOFFICE = shutil.which("soffice") or shutil.which("libreoffice")
needs_soffice = pytest.mark.skipif(
    SOFFICE is None,
    reason="LibreOffice (soffice) is not installed: apt-get install --no-install-recommends "
    "libreoffice-writer-nogui libreoffice-calc-nogui libreoffice-impress-nogui",
)

W = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"


def write_docx(path: Path, pages: list[str]) -> None:
    """A minimal valid DOCX: one paragraph per page, separated by page breaks."""
    body = []
    for number, text in enumerate(pages):
        if number:
            body.append('<w:p><w:r><w:br w:type="page"/></w:r></w:p>')
        body.append(f"<w:p><w:r><w:t>{text}</w:t></w:r></w:p>")
    files = {
        "[Content_Types].xml": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Default Extension="rels" '
            'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/word/document.xml" ContentType="application/'
            'vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/>'
            "</Types>"
        ),
        "_rels/.rels": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/'
            '2006/relationships/officeDocument" Target="word/document.xml"/>'
            "</Relationships>"
        ),
        "word/document.xml": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            f'<w:document xmlns:w="{W}"><w:body>{"".join(body)}</w:body></w:document>'
        ),
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)


def write_odt(path: Path, pages: list[str]) -> None:
    """A minimal valid ODT (the mimetype entry first and stored, as the format requires)."""
    paragraphs = "".join(
        f'<text:p text:style-name="{"Break" if n else "Standard"}">{t}</text:p>'
        for n, t in enumerate(pages)
    )
    content = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<office:document-content xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0"'
        ' xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0"'
        ' xmlns:style="urn:oasis:names:tc:opendocument:xmlns:style:1.0"'
        ' xmlns:fo="urn:oasis:names:tc:opendocument:xmlns:xsl-fo-compatible:1.0"'
        ' office:version="1.2">'
        "<office:automatic-styles>"
        '<style:style style:name="Break" style:family="paragraph">'
        '<style:paragraph-properties fo:break-before="page"/></style:style>'
        "</office:automatic-styles>"
        f"<office:body><office:text>{paragraphs}</office:text></office:body>"
        "</office:document-content>"
    )
    manifest = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<manifest:manifest xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0"'
        ' manifest:version="1.2">'
        '<manifest:file-entry manifest:full-path="/" manifest:version="1.2"'
        ' manifest:media-type="application/vnd.oasis.opendocument.text"/>'
        '<manifest:file-entry manifest:full-path="content.xml" manifest:media-type="text/xml"/>'
        "</manifest:manifest>"
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            zipfile.ZipInfo("mimetype"),
            "application/vnd.oasis.opendocument.text",
            compress_type=zipfile.ZIP_STORED,
        )
        archive.writestr("content.xml", content, compress_type=zipfile.ZIP_DEFLATED)
        archive.writestr("META-INF/manifest.xml", manifest, compress_type=zipfile.ZIP_DEFLATED)


def pdf_pages(path: Path) -> int:
    data = path.read_bytes()
    assert data.startswith(b"%PDF-"), data[:20]
    assert data.rstrip().endswith(b"%%EOF")
    return len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", data))


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    storage = tmp_path / "storage"
    (storage / "in").mkdir(parents=True)
    monkeypatch.setenv(env.STORAGE_ROOT, str(storage))
    monkeypatch.delenv(env.SOFFICE_PATH, raising=False)
    monkeypatch.setenv("JOBYARD_JOB_DOCUMENT_CONVERT_BACKOFF", "0")
    return storage


# --- never skipped: paths outside the root are refused ---------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"input_path": "/etc/passwd.docx"}, "is absolute"),
        ({"input_path": "~/notes.docx"}, "is absolute"),
        ({"input_path": "../secret.docx"}, "contains '..'"),
        ({"input_path": "in/../../secret.docx"}, "contains '..'"),
        ({"input_path": "in\\..\\..\\x.docx"}, "use / as the path separator"),
        ({"output_path": "/tmp/out.pdf"}, "is absolute"),
        ({"output_path": "out/../../x.pdf"}, "contains '..'"),
        ({"input_path": "in/a.exe"}, "cannot convert this type"),
        ({"output_path": "out/a.docx"}, "must be a .pdf"),
        ({"input_path": ""}, "empty path"),
    ],
)
def test_paths_outside_the_root_are_refused_at_dispatch(
    change: dict[str, str], reason: str
) -> None:
    with pytest.raises(InvalidPayloadError, match=re.escape(reason)):
        get_spec("document.convert").validate({"input_path": "in/a.docx", **change})


def test_symlinks_escaping_the_root_are_refused_at_run_time(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    write_docx(outside / "secret.docx", ["secret"])
    (root / "in" / "link.docx").symlink_to(outside / "secret.docx")
    (root / "escape").symlink_to(outside)

    with pytest.raises(PermanentError, match="outside the storage root"):
        run_inline("document.convert", {"input_path": "in/link.docx"})
    with pytest.raises(PermanentError, match="outside the storage root"):
        run_inline("document.convert", {"input_path": "escape/secret.docx"})
    write_docx(root / "in" / "ok.docx", ["fine"])
    with pytest.raises(PermanentError, match=r"output 'escape/stolen\.pdf' resolves to .*outside"):
        run_inline(
            "document.convert", {"input_path": "in/ok.docx", "output_path": "escape/stolen.pdf"}
        )
    # The step itself refuses what validation would have (a caller skipping dispatch).
    with pytest.raises(PermanentError, match=re.escape("contains '..'")):
        document.inside_root(root.resolve(), "../outside/secret.docx", "input")
    assert sorted(p.name for p in outside.iterdir()) == ["secret.docx"]  # nothing written there


def test_missing_storage_root_fails_at_check_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(env.STORAGE_ROOT, raising=False)
    spec = get_spec("document.convert")
    with pytest.raises(MissingSettingError, match="JOBYARD_STORAGE_ROOT"):
        spec.check_environment()
    assert (spec.queue, spec.timeout, spec.retry.attempts, spec.retry.backoff) == (
        "data-sync",
        120.0,
        3,
        5.0,
    )


def test_missing_input_is_permanent(root: Path) -> None:
    with pytest.raises(PermanentError, match="does not exist"):
        run_inline("document.convert", {"input_path": "in/nothing.docx"})


def test_absent_soffice_names_the_package(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_docx(root / "in" / "a.docx", ["a"])
    empty = root.parent / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(PermanentError, match="libreoffice-writer-nogui"):
        run_inline("document.convert", {"input_path": "in/a.docx"})


# --- real conversions ------------------------------------------------------------------------


@needs_soffice
def test_docx_is_converted_to_pdf(root: Path) -> None:
    write_docx(root / "in" / "report.docx", ["First page", "Second page"])
    result = run_inline(
        "document.convert", {"input_path": "in/report.docx", "output_path": "out/report.pdf"}
    )
    pdf = root / "out" / "report.pdf"
    assert result == {
        "input_path": "in/report.docx",
        "output_path": "out/report.pdf",
        "bytes": pdf.stat().st_size,
    }
    assert pdf_pages(pdf) == 2  # both pages came through, not an empty document
    assert sorted(p.name for p in (root / "out").iterdir()) == ["report.pdf"]  # no leftovers


@needs_soffice
def test_odt_converts_next_to_its_input_by_default(root: Path) -> None:
    write_odt(root / "in" / "letter.odt", ["Dear reader", "Page two", "Page three"])
    result = run_inline("document.convert", {"input_path": "in/letter.odt"})
    assert result["output_path"] == "in/letter.pdf"
    assert pdf_pages(root / "in" / "letter.pdf") == 3


@needs_soffice
def test_parallel_conversions_do_not_collide(root: Path) -> None:
    for number in range(3):
        write_docx(root / "in" / f"doc{number}.docx", [f"doc {number}"] * (number + 1))
    errors: list[BaseException] = []

    def convert(number: int) -> None:
        try:
            run_inline("document.convert", {"input_path": f"in/doc{number}.docx"})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=convert, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [pdf_pages(root / "in" / f"doc{n}.pdf") for n in range(3)] == [1, 2, 3]


def test_a_file_that_is_no_document_fails_permanently(root: Path) -> None:
    (root / "in" / "text.docx").write_bytes(b"this is not a zip file at all")
    with pytest.raises(PermanentError, match=r"'in/text.docx' is not a valid \.docx document"):
        run_inline("document.convert", {"input_path": "in/text.docx"})
    assert not (root / "in" / "text.pdf").exists()


@needs_soffice
def test_a_corrupt_document_fails_permanently(root: Path) -> None:
    with zipfile.ZipFile(root / "in" / "broken.docx", "w") as archive:
        archive.writestr("hello.txt", "a ZIP, but no document inside")
    with pytest.raises(
        PermanentError,
        match=r"could not convert 'in/broken\.docx' .*: Error: source file could not be loaded",
    ):
        run_inline("document.convert", {"input_path": "in/broken.docx"})
    assert not (root / "in" / "broken.pdf").exists()


def test_soffice_override_must_be_executable(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_docx(root / "in" / "a.docx", ["a"])
    monkeypatch.setenv(env.SOFFICE_PATH, str(root / "no-such-soffice"))
    with pytest.raises(PermanentError, match=r"JOBYARD_SOFFICE=.* is not an executable file"):
        run_inline("document.convert", {"input_path": "in/a.docx"})
    assert os.path.exists(root / "in" / "a.docx")
