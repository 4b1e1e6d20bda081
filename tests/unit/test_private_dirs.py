"""Folders holding user data are private (0700), and a tool changes modes only inside its own tree.

Also where a home's PostgreSQL cluster is found: from the run state its start recorded, else where a
start would put it. No server runs here: these are the path rules alone, on a temporary folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest

from polycommit.config import load_settings
from polycommit.tooling.servers import postgres_cluster
from polycommit.tooling.servers.private import private_dir


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_private_folder_and_its_missing_ancestors_in_the_tree_are_created_0700(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o755)
    outside.chmod(0o755)
    tree = outside / "home"
    private_dir(tree / "data" / "kafka" / "kraft", tree)
    for folder in (tree, tree / "data", tree / "data" / "kafka", tree / "data" / "kafka" / "kraft"):
        assert _mode(folder) == 0o700, folder
    assert _mode(outside) == 0o755, "a parent of the tree must keep its mode"


def test_an_existing_looser_folder_of_ours_is_tightened_and_its_parents_are_not(tmp_path: Path) -> None:
    tree = tmp_path / "home"
    (tree / "logs").mkdir(parents=True)
    tree.chmod(0o755)
    (tree / "logs").chmod(0o777)
    tmp_mode = _mode(tmp_path)
    private_dir(tree / "logs", tree)
    assert (_mode(tree), _mode(tree / "logs")) == (0o700, 0o700)
    assert _mode(tmp_path) == tmp_mode


def test_a_folder_outside_the_tree_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        private_dir(tmp_path / "elsewhere", tmp_path / "home")


def test_the_cluster_is_found_where_its_start_recorded_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = dataclasses.replace(load_settings(), home=tmp_path / "home")
    monkeypatch.setattr(postgres_cluster, "as_server_user", lambda: False)
    assert postgres_cluster.recorded(settings) is None
    assert postgres_cluster.locate(settings) == postgres_cluster.in_home(settings)
    elsewhere = postgres_cluster.ClusterPaths(
        tmp_path / "c" / "data", tmp_path / "c" / "run", tmp_path / "c.log", tmp_path
    )
    private_dir(settings.run_dir, settings.home)
    (settings.run_dir / postgres_cluster.STATE_FILE).write_text(json.dumps(elsewhere.to_json()))
    assert postgres_cluster.locate(settings) == elsewhere


def test_not_as_root_the_cluster_stays_in_the_home_and_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = dataclasses.replace(load_settings(), home=tmp_path / "home")
    monkeypatch.setattr(postgres_cluster, "as_server_user", lambda: False)
    paths = postgres_cluster.prepare(settings)
    assert paths.root is None and settings.home in paths.data.parents
    assert postgres_cluster.recorded(settings) == paths
    assert _mode(paths.data) == 0o700 and _mode(settings.home) == 0o700
    assert paths.log.is_file()


def test_as_root_the_cluster_lives_in_the_postgres_users_folder_outside_the_home(tmp_path: Path) -> None:
    # The suite runs as root like scripts/setup (apt); the non-root layout is the test above.
    assert os.geteuid() == 0, "this test needs root: the postgres OS user's folder is used only then"
    settings = dataclasses.replace(load_settings(), home=tmp_path / "home")
    paths = postgres_cluster.owned_by_server(settings)
    assert paths.root is not None and settings.home not in paths.root.parents
    assert paths.root.name.startswith("polycommit-")
    assert {paths.data.parent, paths.sockets.parent, paths.log.parent} == {paths.root}
    other = dataclasses.replace(settings, home=tmp_path / "other")
    assert postgres_cluster.owned_by_server(other).root != paths.root, "two homes must not share a cluster"
