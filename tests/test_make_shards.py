"""make_shards folder / csv: tiny image folders and CSV files written here, shards read back with tarfile."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from PIL import Image

from data_pipelines.folder_source import csv_samples, folder_samples
from data_pipelines.make_shards import main
from data_pipelines.shard_writer import ShardSample, write_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def encoded(size: tuple[int, int], fmt: str, colour: tuple[int, int, int] = (200, 40, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def write(path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def read_shards(out) -> dict[str, list[tuple[str, bytes]]]:
    """Shard file name -> its (member name, bytes) in tar order."""
    shards = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar"):
            with tarfile.open(out / name) as tar:
                shards[name] = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    return shards


@pytest.fixture
def folder(tmp_path):
    """a.png, b.jpg (in a subfolder), c.webp with captions; d.jpg without one; e.jpg corrupt; notes.md ignored."""
    root = tmp_path / "images"
    images = {"a.png": encoded((6, 4), "PNG"), "sub/b.jpg": encoded((8, 8), "JPEG"),
              "sub/c.webp": encoded((5, 7), "WEBP"), "sub/d.jpeg": encoded((3, 3), "JPEG")}
    for name, data in images.items():
        write(root / name, data)
    for name, caption in {"a": "a red square", "sub/b": "a red block\n", "sub/c": "a tall red tile"}.items():
        write(root / f"{name}.txt", caption)
    write(root / "sub/e.jpg", b"not an image")
    write(root / "sub/e.txt", "broken")
    write(root / "notes.md", "not a sample")
    return root, images


def test_folder_samples(folder):
    root, images = folder
    samples = folder_samples(str(root))
    assert [samples[i]["__key__"] for i in range(len(samples))] == ["a", "sub/b", "sub/c", "sub/d", "sub/e"]
    a, d = samples[0], samples[3]
    assert a == {"__key__": "a", "__source__": str(root), "path": str(root / "a.png"), "image": images["a.png"],
                 "caption": "a red square"}
    assert samples[1]["caption"] == "a red block" and "caption" not in d and d["image"] == images["sub/d.jpeg"]


def test_folder_shards_round_trip(folder, tmp_path, capsys):
    root, images = folder
    out = tmp_path / "shards"
    assert main(["folder", "--root", str(root), "--out", str(out), "--samples-per-shard", "2"]) == 0
    assert capsys.readouterr().out == f"wrote 4 samples in 3 shards to {out}; skipped 1 (corrupt_image: 1)\n"
    shards = read_shards(out)
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 2, "00002.tar": 0}
    assert [name for name, _ in shards["00000.tar"] + shards["00001.tar"]] == [
        "000000000.png", "000000000.txt", "000000000.json", "000000001.jpg", "000000001.txt", "000000001.json",
        "000000002.webp", "000000002.txt", "000000002.json", "000000003.jpg", "000000003.json"]
    members = dict(shards["00000.tar"] + shards["00001.tar"])
    assert members["000000000.png"] == images["a.png"] and members["000000003.jpg"] == images["sub/d.jpeg"]
    assert members["000000001.txt"] == b"a red block"
    assert json.loads(members["000000002.json"]) == {
        "key": "000000002", "caption": "a tall red tile", "path": str(root / "sub/c.webp"), "width": 5,
        "height": 7, "original_width": 5, "original_height": 7}
    assert "caption" not in json.loads(members["000000003.json"])


def test_labels_from_dirs_resize_and_shuffle(tmp_path):
    root = tmp_path / "classes"
    for name, size in {"dog/x.png": (64, 32), "cat/y.jpg": (10, 20), "cat/z.jpg": (4, 4)}.items():
        write(root / name, encoded(size, "PNG" if name.endswith("png") else "JPEG"))
    (root / "emu").mkdir()  # an empty class folder still takes its index
    out = tmp_path / "shards"
    assert main(["folder", "--root", str(root), "--out", str(out), "--labels-from-dirs",
                 "--resize-max", "16"]) == 0
    assert json.loads((out / "classnames.json").read_text()) == ["cat", "dog", "emu"]
    members = dict(read_shards(out)["00000.tar"])
    metas = [json.loads(members[f"00000000{i}.json"]) for i in range(3)]
    assert [meta["label"] for meta in metas] == [0, 0, 1]
    assert [(m["width"], m["height"], m["original_width"]) for m in metas] == [(8, 16, 10), (4, 4, 4), (16, 8, 64)]
    assert Image.open(io.BytesIO(members["000000002.jpg"])).size == (16, 8)  # the PNG, re-encoded as JPEG
    orders = []
    for run in range(2):
        main(["folder", "--root", str(root), "--out", str(tmp_path / f"shuffled{run}"), "--shuffle-seed", "3"])
        shard = read_shards(tmp_path / f"shuffled{run}")["00000.tar"]
        orders.append([json.loads(data)["path"] for name, data in shard if name.endswith(".json")])
    assert orders[0] == orders[1]
    assert sorted(orders[0]) == [str(root / name) for name in ("cat/y.jpg", "cat/z.jpg", "dog/x.png")]
    assert orders[0] != sorted(orders[0])


def test_csv_shards_with_relative_paths_and_custom_columns(tmp_path, capsys):
    images = {"img/p.jpg": encoded((4, 4), "JPEG"), "img/q.png": encoded((2, 3), "PNG"),
              "img/s.gif": encoded((2, 2), "GIF")}
    for name, data in images.items():
        write(tmp_path / "data" / name, data)
    absolute = tmp_path / "elsewhere" / "r.webp"
    write(absolute, encoded((3, 3), "WEBP"))
    write(tmp_path / "data" / "list.csv",
          f'image,title,extra\nimg/p.jpg,"a photo, with a comma",1\nimg/q.png,second,2\n{absolute},third,3\nimg/s.gif,a gif,4\n')
    out = tmp_path / "shards"
    assert main(["csv", "--csv", str(tmp_path / "data" / "list.csv"), "--out", str(out),
                 "--csv-img-key", "image", "--csv-caption-key", "title"]) == 0
    assert capsys.readouterr().out == f"wrote 3 samples in 1 shards to {out}; skipped 1 (unsupported_format: 1)\n"
    members = dict(read_shards(out)["00000.tar"])
    assert sorted(members) == sorted(f"00000000{i}.{ext}" for i, image_ext in enumerate(["jpg", "png", "webp"])
                                     for ext in (image_ext, "txt", "json"))
    assert members["000000000.jpg"] == images["img/p.jpg"] and members["000000002.webp"] == absolute.read_bytes()
    assert members["000000000.txt"] == b"a photo, with a comma"
    assert json.loads(members["000000001.json"])["path"] == str(tmp_path / "data" / "img/q.png")
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 3}


def test_csv_samples_tsv_and_given_separator(tmp_path):
    write(tmp_path / "p.jpg", encoded((4, 4), "JPEG"))
    write(tmp_path / "list.tsv", "filepath\tcaption\np.jpg\ttab, separated\np.jpg\tagain\n")
    samples = csv_samples(str(tmp_path / "list.tsv"))
    assert [(s["__key__"], s["caption"]) for s in (samples[0], samples[1])] == [
        ("000000000", "tab, separated"), ("000000001", "again")]
    assert samples[0]["image"] == (tmp_path / "p.jpg").read_bytes()
    write(tmp_path / "list.txt", "filepath;caption\np.jpg;semicolons\n")
    assert csv_samples(str(tmp_path / "list.txt"), separator=";")[0]["caption"] == "semicolons"


@pytest.mark.parametrize("argv, message", [
    (["folder", "--root", "{tmp}/absent"], "error: image folder not found: {tmp}/absent"),
    (["folder", "--root", "{tmp}/empty"], "error: no images (.jpg, .jpeg, .png, .webp) under {tmp}/empty"),
    (["csv", "--csv", "{tmp}/absent.csv"], "error: CSV file not found: {tmp}/absent.csv"),
    (["csv", "--csv", "{tmp}/list.csv", "--csv-caption-key", "title"],
     "error: {tmp}/list.csv has no column 'title' (columns: filepath, caption)"),
    (["csv", "--csv", "{tmp}/missing.csv"],
     "error: 2 of 3 images listed in {tmp}/missing.csv are missing, first: {tmp}/gone.jpg"),
    (["folder", "--root", "{tmp}/flat", "--labels-from-dirs"],
     "error: image {tmp}/flat/x.jpg is not in a class folder (labels_from_dirs expects root/<class>/<image>)"),
    (["csv", "--csv", "{tmp}/list.csv", "--out", "{tmp}/full"],
     "error: {tmp}/full already holds .tar shards not written by make_shards; pass --overwrite to replace them "
     "or write to an empty folder"),
])
def test_bad_input_gives_one_line_error(tmp_path, capsys, argv, message):
    write(tmp_path / "p.jpg", encoded((4, 4), "JPEG"))
    write(tmp_path / "flat" / "x.jpg", encoded((4, 4), "JPEG"))
    write(tmp_path / "list.csv", "filepath,caption\np.jpg,ok\n")
    write(tmp_path / "missing.csv", "filepath,caption\ngone.jpg,a\np.jpg,b\nalso_gone.jpg,c\n")
    write(tmp_path / "full" / "00000.tar", b"")
    (tmp_path / "empty").mkdir()
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    assert main(argv + ([] if "--out" in argv else ["--out", str(tmp_path / "out")])) == 2
    assert capsys.readouterr().err == message.format(tmp=tmp_path) + "\n"


def test_synthetic_still_writes_jpeg_shards(tmp_path):
    assert main(["synthetic", "--out", str(tmp_path), "--train-samples", "6", "--eval-samples", "3",
                 "--image-size", "8", "--samples-per-shard", "4"]) == 0
    assert json.loads((tmp_path / "train" / "sizes.json").read_text()) == {"00000.tar": 4, "00001.tar": 2}
    members = dict(read_shards(tmp_path / "eval")["00000.tar"])
    assert sorted(members)[:3] == ["000000000.jpg", "000000000.json", "000000000.txt"]
    assert json.loads(members["000000001.json"])["caption"] == members["000000001.txt"].decode()


def test_unreadable_files_and_captions_that_are_not_utf8_are_skipped_and_counted(folder, tmp_path, capsys):
    root, _ = folder
    write(root / "sub/f.jpg", encoded((4, 4), "JPEG"))
    write(root / "sub/f.txt", b"caf\xe9 au lait")  # Latin-1, not UTF-8
    os.symlink(tmp_path / "deleted.jpg", root / "g.jpg")  # listed, gone when read
    out = tmp_path / "shards"
    assert main(["folder", "--root", str(root), "--out", str(out), "--samples-per-shard", "3"]) == 0
    assert capsys.readouterr().out == (f"wrote 4 samples in 3 shards to {out}; skipped 3 (caption_not_utf8: 1, "
                                       "corrupt_image: 1, unreadable_file: 1)\n")
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == 4


def test_rerun_resumes_an_interrupted_run_and_overwrite_replaces(folder, tmp_path, capsys):
    root, _ = folder
    out = tmp_path / "shards"
    argv = ["folder", "--root", str(root), "--out", str(out), "--samples-per-shard", "2"]
    assert main(argv) == 0
    complete = read_shards(out)
    # As a run killed while writing shard 1 leaves it: no 00001.tar, a .partial, progress without the shard.
    os.remove(out / "00001.tar")
    write(out / "00001.tar.partial", b"half a shard")
    progress = json.loads((out / "progress.json").read_text())
    del progress["shards"]["00001.tar"]
    (out / "progress.json").write_text(json.dumps(progress))
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out == (f"wrote 4 samples in 3 shards (2 kept from an earlier run) to {out}; "
                                       "skipped 1 (corrupt_image: 1)\n")
    assert read_shards(out) == complete and sorted(os.listdir(out)) == [
        "00000.tar", "00001.tar", "00002.tar", "progress.json", "sizes.json"]
    assert main(argv[:-1] + ["3"]) == 2  # other settings: refused without --overwrite
    assert "written with other settings; pass --overwrite" in capsys.readouterr().err
    assert main(argv[:-1] + ["3", "--overwrite"]) == 0
    assert sorted(read_shards(out)) == ["00000.tar", "00001.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 1}


def test_a_failed_shard_write_leaves_no_partial_file(tmp_path):
    def samples():
        yield ShardSample("000000000", encoded((4, 4), "JPEG"), "jpg", "a caption", {})
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_shard(str(tmp_path / "00000.tar"), samples())
    assert os.listdir(tmp_path) == []


def worker_pids(parent: int) -> list[int]:
    """Processes started by `parent` through multiprocessing's spawn."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                spawned = b"--multiprocessing-fork" in f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and spawned:
            pids.append(int(entry))
    return pids


def test_a_killed_worker_fails_the_run_with_one_line(folder, tmp_path):
    root, _ = folder
    os.mkfifo(root / "sub/d.txt")  # d's caption: reading it waits for a writer that never comes
    out = tmp_path / "shards"
    run = subprocess.Popen([sys.executable, "-m", "data_pipelines.make_shards", "folder", "--root", str(root),
                            "--out", str(out), "--samples-per-shard", "1"], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (workers := worker_pids(run.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert workers, "no worker process started"
        os.kill(workers[0], signal.SIGKILL)  # as the OS's out-of-memory killer would
        _, err = run.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)  # the run, and its workers if it hung
        run.wait()
    assert run.returncode == 1
    assert err == ("error: a worker process died (killed by the OS? out of memory?); run the same command again "
                   "to finish\n")
    assert not [name for name in os.listdir(out) if name.endswith(".partial")]
