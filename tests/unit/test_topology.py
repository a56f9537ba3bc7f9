"""testbed.topology: shipped topology files load; malformed ones fail with one good line.

Each kind of malformed file goes through the real CLI (`python -m testbed topology check
FILE`) in a subprocess, so what is checked is exactly what a user sees: exit code 2, nothing
on stdout, and one stderr line naming the file, the field, the bad value and what was
expected. Further variants of a kind are checked in-process (via="load"), which is much
quicker; test_in_process_error_is_the_same_line shows the CLI prints exactly that message.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed import errors
from testbed.topology import load_topology

REPO = Path(__file__).parents[2]
SHIPPED = sorted((REPO / "topologies").glob("*.yaml"))
GBIT = 10**9

GOOD: dict[str, Any] = {
    "prefill_nodes": 1,
    "decode_nodes": 1,
    "gpus_per_node": 4,
    "links": {"cnic": "400Gbit", "snic": "400Gbit", "pcie": "1600Gbit"},
    "storage": {"hosts": 2, "link": "400Gbit"},
    "scale": 4000,
    "qos": {"high": 0.99, "low": 0.01},
    "backend": "docker",
}
DELETE = object()


def spec(**changes: Any) -> str:
    """GOOD as YAML, with fields ('links__cnic' for links.cnic) changed, added or DELETEd."""
    data = copy.deepcopy(GOOD)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = data
        for part in parents:
            target = target[part]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
    return yaml.safe_dump(data, sort_keys=False)


def check(*paths: Path) -> subprocess.CompletedProcess[str]:
    """`testbed topology check PATH...`, the real CLI in a subprocess."""
    return subprocess.run([sys.executable, "-m", "testbed", "topology", "check",
                           *map(str, paths)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def one_error_line(path: Path, via: str = "cli") -> str:
    """Check `path`, expecting it refused with one good line; return the text after the path.

    via="cli" runs the real CLI in a subprocess; via="load" calls load_topology in-process
    and takes the line the CLI prints for that error.
    """
    if via == "cli":
        result = check(path)
        assert "Traceback" not in result.stderr
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        stderr = result.stderr
    else:
        with pytest.raises(errors.TestbedError) as info:
            load_topology(path)
        stderr = f"testbed: {info.value}\n"
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert stderr == lines[0] + "\n"
    line = lines[0]
    assert line.startswith(f"testbed: {path}"), line
    assert re.search(r"\bexpected\b", line), line
    return line.removeprefix(f"testbed: {path}")


# ---------------------------------------------------------------------------- shipped files

def test_topologies_are_shipped() -> None:
    names = {path.name for path in SHIPPED}
    assert {"1p1d.yaml", "1p2d.yaml", "2p1d.yaml", "2p4d.yaml", "mini.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[path.name for path in SHIPPED])
def test_shipped_topology_loads(path: Path) -> None:
    topology = load_topology(path)
    assert topology.name == path.stem
    # real-cluster rates: one 400 Gbit/s CNIC per GPU; one 400 Gbit/s SNIC per node, or
    # the paper's SNIC bandwidth per GPU (400 Gbit/s per 8 GPUs)
    assert topology.links.cnic == 400 * GBIT
    assert topology.links.snic in (400 * GBIT, 400 * GBIT * topology.gpus_per_node // 8)
    # the node's PCIe side is never the bottleneck: it carries every GPU's CNIC share
    assert topology.links.pcie >= topology.gpus_per_node * topology.links.cnic
    assert topology.links.pcie >= topology.links.snic
    # the storage hosts together can saturate every node's SNIC at once
    assert (topology.storage.hosts * topology.storage.link
            >= topology.nodes * topology.links.snic)
    assert topology.scale == 4000
    assert (topology.qos.high, topology.qos.low) == (0.99, 0.01)
    # commented like 1p1d.yaml: the file opens with a comment saying what it is
    assert path.read_text().startswith("# ")


@pytest.mark.parametrize("name, prefill, decode, gpus, storage, backend", [
    ("1p1d", 1, 1, 4, 2, "docker"),
    ("1p2d", 1, 2, 4, 2, "docker"),
    ("2p1d", 2, 1, 4, 2, "docker"),
    ("2p4d", 2, 4, 8, 4, "docker"),
    ("mini", 1, 1, 1, 1, "netns"),
])
def test_shipped_topology_shapes(name: str, prefill: int, decode: int, gpus: int,
                                 storage: int, backend: str) -> None:
    topology = load_topology(REPO / "topologies" / f"{name}.yaml")
    assert (topology.prefill_nodes, topology.decode_nodes) == (prefill, decode)
    assert topology.gpus_per_node == gpus
    assert topology.storage.hosts == storage
    assert topology.backend == backend


def test_cli_checks_every_shipped_topology() -> None:
    result = check(*SHIPPED)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == len(SHIPPED)
    for path, line in zip(SHIPPED, lines):
        assert line.startswith(f"{path}: ok: "), line


# --------------------------------------------------------------------------- overrides

def test_backend_override(tmp_path: Path) -> None:
    path = tmp_path / "over.yaml"
    path.write_text(spec(backend="docker"))
    assert load_topology(path).backend == "docker"
    overridden = load_topology(path, backend="netns")
    assert overridden.backend == "netns"
    assert overridden.gpus_per_node == 4           # everything else as in the file
    assert load_topology(REPO / "topologies" / "1p1d.yaml", backend="netns").backend == "netns"


def test_override_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "over.yaml"
    path.write_text(spec())
    with pytest.raises(errors.TestbedError, match=r"backend: got 'mininet', expected"):
        load_topology(path, backend="mininet")


def test_name_defaults_to_file_stem_and_can_be_set(tmp_path: Path) -> None:
    path = tmp_path / "lab-a.yaml"
    path.write_text(spec())
    assert load_topology(path).name == "lab-a"
    path.write_text(spec(name="other"))
    assert load_topology(path).name == "other"


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    """The duplicate-key check must not refuse '<<: ...' followed by an override."""
    path = tmp_path / "merge.yaml"
    path.write_text(spec(links=DELETE) + "links:\n"
                    "  <<: {cnic: 400Gbit, snic: 400Gbit, pcie: 800Gbit}\n"
                    "  pcie: 1600Gbit\n")
    topology = load_topology(path)
    assert topology.links.pcie == 1600 * GBIT
    assert topology.links.cnic == 400 * GBIT


# ---------------------------------------------------------------------- malformed files

# (id, file name, content, field path the message names, bad value it shows, via)
FIELD_ERRORS = [
    ("top-level-list", "list.yaml", "- prefill_nodes\n- decode_nodes\n",
     "(top level)", "['prefill_nodes', 'decode_nodes']", "cli"),
    ("top-level-scalar", "scalar.yaml", "just some text\n",
     "(top level)", "'just some text'", "load"),
    ("misspelt-field", "misspelt.yaml",
     spec(gpus_per_node=DELETE).replace("decode_nodes: 1\n", "decode_nodes: 1\ngpu_per_node: 4\n"),
     "gpu_per_node", "4", "cli"),
    ("unknown-field", "unknown.yaml", spec(colour="blue"), "colour", "'blue'", "load"),
    ("unknown-nested-field", "nested.yaml", spec(links__nvlink="900Gbit"),
     "links.nvlink", "'900Gbit'", "load"),
    ("wrong-type", "wrongtype.yaml", spec(gpus_per_node="four"), "gpus_per_node", "'four'",
     "cli"),
    ("bool-for-count", "boolcount.yaml", spec(gpus_per_node=True), "gpus_per_node", "True",
     "load"),
    ("float-for-count", "floatcount.yaml", spec(storage__hosts=2.5), "storage.hosts", "2.5",
     "load"),
    ("mapping-for-count", "dictcount.yaml", spec(gpus_per_node={"a": 1}),
     "gpus_per_node", "{'a': 1}", "load"),
    ("scalar-for-mapping", "scalarmap.yaml", spec(storage="big"), "storage", "'big'", "load"),
    ("bad-rate-unit", "badunit.yaml", spec(links__cnic="400Gbs"), "links.cnic", "'400Gbs'",
     "cli"),
    ("rate-without-unit", "nounit.yaml", spec(storage__link=400), "storage.link", "400",
     "load"),
    ("zero-count", "zero.yaml", spec(prefill_nodes=0), "prefill_nodes", "0", "cli"),
    ("negative-count", "negative.yaml", spec(storage__hosts=-3), "storage.hosts", "-3", "load"),
    ("too-many-gpus", "gpus.yaml", spec(gpus_per_node=17), "gpus_per_node", "17", "load"),
    ("too-many-nodes", "nodes.yaml", spec(prefill_nodes=100, decode_nodes=21),
     "prefill_nodes + decode_nodes", "121", "load"),
    ("qos-sum-above-one", "qos.yaml", spec(qos__low=0.5), "qos", "high 0.99 + low 0.5", "cli"),
    ("qos-share-out-of-range", "qosone.yaml", spec(qos__high=1.5), "qos.high", "1.5", "load"),
    ("unknown-backend", "backend.yaml", spec(backend="mininet"), "backend", "'mininet'", "cli"),
    ("scaled-rate-too-high", "scale.yaml", spec(scale=1), "links.cnic", "400Gbit", "cli"),
    ("scaled-rate-too-low", "slow.yaml", spec(storage__link="1Gbit"), "storage.link", "1Gbit",
     "load"),
    ("scale-below-one", "scalezero.yaml", spec(scale=0), "scale", "0", "load"),
    ("bad-name", "named.yaml", spec(name="Big Cluster"), "name", "'Big Cluster'", "load"),
]


@pytest.mark.parametrize("filename, content, field, value, via",
                         [case[1:] for case in FIELD_ERRORS],
                         ids=[case[0] for case in FIELD_ERRORS])
def test_malformed_field(tmp_path: Path, filename: str, content: str, field: str,
                         value: str, via: str) -> None:
    path = tmp_path / filename
    path.write_text(content)
    rest = one_error_line(path, via)
    assert rest.startswith(f": {field}: "), rest
    assert value in rest, rest


@pytest.mark.parametrize("content, field, via", [
    (spec(links__snic=DELETE), "links.snic", "cli"),
    (spec(storage=DELETE), "storage", "load"),
    (spec(prefill_nodes=DELETE), "prefill_nodes", "load"),
], ids=["nested", "section", "top-level"])
def test_missing_field(tmp_path: Path, content: str, field: str, via: str) -> None:
    path = tmp_path / "missing.yaml"
    path.write_text(content)
    rest = one_error_line(path, via)
    assert rest.startswith(f": {field}: missing"), rest


def test_misspelt_field_suggests_the_right_one(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(spec(links__snic=DELETE, links__sncc="400Gbit"))
    rest = one_error_line(path, "load")
    # the misspelling is reported, not the "missing" field it leaves behind
    assert rest.startswith(": links.sncc: got '400Gbit'"), rest
    assert "'snic'" in rest


def test_scaled_rate_message_names_the_scale_and_range(tmp_path: Path) -> None:
    path = tmp_path / "scale.yaml"
    path.write_text(spec(scale=1))
    rest = one_error_line(path, "load")
    assert "scale 1" in rest and "1Mbit" in rest and "10Gbit" in rest, rest


@pytest.mark.parametrize("content, line_column, value, via", [
    ("prefill_nodes: 1\n\tdecode_nodes: 1\n", "2:1", "'decode_nodes: 1'", "cli"),
    ("prefill_nodes: 1\ndecode_nodes: [1\n", r"\d+:\d+", "'decode_nodes: [1'", "load"),
    ("prefill_nodes: 1\nlinks:\n  cnic: 400Gbit\n snic: 400Gbit\n", "4:2", "'snic: 400Gbit'",
     "load"),
    ('name: "unterminated\n', r"\d+:\d+", "'name: \"unterminated'", "load"),
    ("links:\n  cnic: 400Gbit\n  cnic: 40Gbit\n", "3:3", "'cnic'", "load"),
], ids=["tab", "unclosed-bracket", "bad-indent", "unclosed-quote", "duplicate-key"])
def test_yaml_syntax_error(tmp_path: Path, content: str, line_column: str, value: str,
                           via: str) -> None:
    path = tmp_path / "syntax.yaml"
    path.write_text(content)
    rest = one_error_line(path, via)
    assert re.match(rf":{line_column}: invalid YAML: ", rest), rest
    assert value in rest, rest


@pytest.mark.parametrize("content, via", [("", "cli"), ("\n", "load"),
                                          ("# only a comment\n", "load")],
                         ids=["empty", "blank", "comment"])
def test_empty_file(tmp_path: Path, content: str, via: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(content)
    rest = one_error_line(path, via)
    assert rest.startswith(": (top level): got an empty file"), rest


def test_file_that_does_not_exist(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    rest = one_error_line(path)
    assert rest.startswith(": cannot read"), rest
    assert "No such file" in rest


def test_name_from_file_name_says_so(tmp_path: Path) -> None:
    path = tmp_path / "my_cluster.yaml"          # '_' is not allowed in a name
    path.write_text(spec())
    rest = one_error_line(path, "load")
    assert rest.startswith(": name: got 'my_cluster'"), rest
    assert "file name" in rest


def test_first_bad_file_stops_the_check(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec(backend="mininet"))
    result = check(SHIPPED[0], bad)
    assert result.returncode == 2
    assert result.stdout.startswith(f"{SHIPPED[0]}: ok: ")
    assert result.stderr.startswith(f"testbed: {bad}: backend: ")


def test_in_process_error_is_the_same_line(tmp_path: Path) -> None:
    path = tmp_path / "same.yaml"
    path.write_text(spec(links__cnic="400Gbs"))
    with pytest.raises(errors.TestbedError) as info:
        load_topology(path)
    assert f"testbed: {info.value}\n" == check(path).stderr
