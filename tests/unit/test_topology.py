"""testbed.topology: shipped topology files load; malformed ones fail with one good line.

The malformed files go through the real CLI (`python -m testbed topology check FILE`) in a
subprocess, so what is checked is exactly what a user sees: exit code 2, nothing on
stdout, and one stderr line naming the file, the field, the bad value and what was expected.
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
    """GOOD as YAML, with dotted fields ('links__cnic') changed, added or (DELETE) removed."""
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
    return subprocess.run([sys.executable, "-m", "testbed", "topology", "check",
                           *map(str, paths)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def one_error_line(result: subprocess.CompletedProcess[str], path: Path) -> str:
    """The assertions every malformed file shares; returns the message after the path."""
    assert "Traceback" not in result.stderr
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stderr == lines[0] + "\n"
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
    # real-cluster rates: one 400 Gbit/s CNIC per GPU, one 400 Gbit/s SNIC per node
    assert topology.links.cnic == 400 * GBIT
    assert topology.links.snic == 400 * GBIT
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
    ("1p2d", 1, 2, 4, None, "docker"),
    ("2p1d", 2, 1, 4, None, "docker"),
    ("2p4d", 2, 4, 8, 4, "docker"),
    ("mini", 1, 1, 1, 1, "netns"),
])
def test_shipped_topology_shapes(name: str, prefill: int, decode: int, gpus: int,
                                 storage: int | None, backend: str) -> None:
    topology = load_topology(REPO / "topologies" / f"{name}.yaml")
    assert (topology.prefill_nodes, topology.decode_nodes) == (prefill, decode)
    assert topology.gpus_per_node == gpus
    if storage is not None:
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
    """The duplicate-key check must not refuse '<<: *anchor' followed by an override."""
    path = tmp_path / "merge.yaml"
    path.write_text(spec(links=DELETE) + "links:\n"
                    "  <<: {cnic: 400Gbit, snic: 400Gbit, pcie: 800Gbit}\n"
                    "  pcie: 1600Gbit\n")
    topology = load_topology(path)
    assert topology.links.pcie == 1600 * GBIT
    assert topology.links.cnic == 400 * GBIT


# ---------------------------------------------------------------------- malformed files

# (id, file name, content, field path named in the message, bad value shown in it)
FIELD_ERRORS = [
    ("top-level-list", "list.yaml", "- prefill_nodes\n- decode_nodes\n",
     "(top level)", "['prefill_nodes', 'decode_nodes']"),
    ("top-level-scalar", "scalar.yaml", "just some text\n",
     "(top level)", "'just some text'"),
    ("misspelt-field", "misspelt.yaml",
     spec(gpus_per_node=DELETE).replace("decode_nodes: 1\n", "decode_nodes: 1\ngpu_per_node: 4\n"),
     "gpu_per_node", "4"),
    ("unknown-nested-field", "nested.yaml", spec(links__cnics="400Gbit"),
     "links.cnics", "'400Gbit'"),
    ("wrong-type", "wrongtype.yaml", spec(gpus_per_node="four"), "gpus_per_node", "'four'"),
    ("bool-for-count", "boolcount.yaml", spec(gpus_per_node=True), "gpus_per_node", "True"),
    ("mapping-for-count", "dictcount.yaml", spec(gpus_per_node={"a": 1}),
     "gpus_per_node", "{'a': 1}"),
    ("scalar-for-mapping", "scalarmap.yaml", spec(storage="big"), "storage", "'big'"),
    ("bad-rate-unit", "badunit.yaml", spec(links__cnic="400Gbs"), "links.cnic", "'400Gbs'"),
    ("rate-without-unit", "nounit.yaml", spec(storage__link=400), "storage.link", "400"),
    ("zero-count", "zero.yaml", spec(prefill_nodes=0), "prefill_nodes", "0"),
    ("negative-count", "negative.yaml", spec(storage__hosts=-3), "storage.hosts", "-3"),
    ("too-many-gpus", "gpus.yaml", spec(gpus_per_node=17), "gpus_per_node", "17"),
    ("too-many-nodes", "nodes.yaml", spec(prefill_nodes=100, decode_nodes=21),
     "prefill_nodes + decode_nodes", "121"),
    ("qos-sum-above-one", "qos.yaml", spec(qos__low=0.5), "qos", "0.99 + low 0.5"),
    ("qos-share-out-of-range", "qosone.yaml", spec(qos__high=1.5), "qos.high", "1.5"),
    ("unknown-backend", "backend.yaml", spec(backend="mininet"), "backend", "'mininet'"),
    ("scaled-rate-too-high", "scale.yaml", spec(scale=1), "links.cnic", "400Gbit"),
    ("scaled-rate-too-low", "slow.yaml", spec(storage__link="1Gbit"), "storage.link", "1Gbit"),
    ("scale-below-one", "scalezero.yaml", spec(scale=0), "scale", "0"),
    ("bad-name", "named.yaml", spec(name="Big Cluster"), "name", "'Big Cluster'"),
]


@pytest.mark.parametrize("filename, content, field, value",
                         [case[1:] for case in FIELD_ERRORS],
                         ids=[case[0] for case in FIELD_ERRORS])
def test_malformed_field(tmp_path: Path, filename: str, content: str, field: str,
                         value: str) -> None:
    path = tmp_path / filename
    path.write_text(content)
    rest = one_error_line(check(path), path)
    assert rest.startswith(f": {field}: "), rest
    assert value in rest, rest


@pytest.mark.parametrize("content, field", [
    (spec(links__snic=DELETE), "links.snic"),
    (spec(storage=DELETE), "storage"),
    (spec(prefill_nodes=DELETE), "prefill_nodes"),
], ids=["nested", "section", "top-level"])
def test_missing_field(tmp_path: Path, content: str, field: str) -> None:
    path = tmp_path / "missing.yaml"
    path.write_text(content)
    rest = one_error_line(check(path), path)
    assert rest.startswith(f": {field}: missing"), rest


def test_misspelt_field_suggests_the_right_one(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(spec(links__snic=DELETE, links__sncc="400Gbit"))
    rest = one_error_line(check(path), path)
    assert rest.startswith(": links.sncc: got '400Gbit'"), rest
    assert "'snic'" in rest        # did you mean


def test_scaled_rate_message_names_the_scale(tmp_path: Path) -> None:
    path = tmp_path / "scale.yaml"
    path.write_text(spec(scale=1))
    rest = one_error_line(check(path), path)
    assert "scale 1" in rest and "1Mbit" in rest and "10Gbit" in rest, rest


@pytest.mark.parametrize("content, line_column, value", [
    ("prefill_nodes: 1\n\tdecode_nodes: 1\n", "2:1", "'decode_nodes: 1'"),
    ("prefill_nodes: 1\ndecode_nodes: [1\n", r"\d+:\d+", "'decode_nodes: [1'"),
    ("prefill_nodes: 1\nlinks:\n  cnic: 400Gbit\n snic: 400Gbit\n", "4:2", "'snic: 400Gbit'"),
    ('name: "unterminated\n', r"\d+:\d+", "'name: \"unterminated'"),
    ("links:\n  cnic: 400Gbit\n  cnic: 40Gbit\n", "3:3", "'cnic'"),
], ids=["tab", "unclosed-bracket", "bad-indent", "unclosed-quote", "duplicate-key"])
def test_yaml_syntax_error(tmp_path: Path, content: str, line_column: str, value: str) -> None:
    path = tmp_path / "syntax.yaml"
    path.write_text(content)
    rest = one_error_line(check(path), path)
    assert re.match(rf":{line_column}: invalid YAML: ", rest), rest
    assert value in rest, rest


@pytest.mark.parametrize("content", ["", "\n", "# only a comment\n"],
                         ids=["empty", "blank", "comment"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(content)
    rest = one_error_line(check(path), path)
    assert rest.startswith(": (top level): got an empty file"), rest


def test_file_that_does_not_exist(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    rest = one_error_line(check(path), path)
    assert rest.startswith(": cannot read"), rest
    assert "No such file" in rest


def test_name_from_file_name_says_so(tmp_path: Path) -> None:
    path = tmp_path / "my_cluster.yaml"          # '_' is not allowed in a name
    path.write_text(spec())
    rest = one_error_line(check(path), path)
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
