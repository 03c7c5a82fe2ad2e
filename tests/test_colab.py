"""utils/colab.py decides what a Colab runtime must install (the decision is tested; pip is not run)."""

from utils.colab import FLOORS, below_floor, keep_bounds, version_tuple


def test_version_tuple_reads_release_numbers():
    assert version_tuple("4.57.1") == (4, 57, 1)
    assert version_tuple("5.23.0") == (5, 23, 0)
    assert version_tuple("5.0.0rc1") == (5, 0, 0)
    assert version_tuple("2.9.0+cu126") == (2, 9, 0)
    assert version_tuple("0.21.2.dev0") == (0, 21, 2)


def test_an_older_stack_is_upgraded_to_the_pins_and_a_newer_one_kept():
    old_colab = {"transformers": "4.57.1", "sentence-transformers": "5.1.0", "peft": "0.17.1",
                 "accelerate": "1.15.0"}
    assert below_floor(old_colab) == ["transformers==5.23.0", "sentence-transformers==6.2.0", "peft==0.21.2"]
    new_colab = {"transformers": "5.24.0", "sentence-transformers": "6.3.0", "peft": "0.21.2",
                 "accelerate": "1.16.0"}
    assert below_floor(new_colab) == []


def test_missing_packages_are_left_to_the_missing_list_and_torch_is_never_pinned():
    assert below_floor({name: None for name in FLOORS}) == []
    assert "torch" not in FLOORS


def test_a_preinstalled_dateutil_2_is_kept_below_3_and_a_newer_one_is_not_touched():
    # pip would otherwise trade Colab's python-dateutil 2.9 for 4.x (kubernetes) against typepy's < 3 and
    # backtrack into compiling pandas; a runtime that already has 3 or later gets no bound (nothing downgraded)
    assert keep_bounds({"python-dateutil": "2.9.0.post0"}) == ["python-dateutil<3"]
    assert keep_bounds({"python-dateutil": "4.0.0"}) == []
    assert keep_bounds({"python-dateutil": None}) == []


def test_floors_are_the_course_pins():
    pins = dict(line.split("==") for line in open("requirements.txt").read().splitlines()
                if "==" in line and not line.startswith("#"))
    for name, floor in FLOORS.items():
        assert pins[name] == floor, f"{name}: floor {floor} but requirements.txt pins {pins[name]}"


def test_what_colab_installs_is_pinned_as_in_requirements():
    from utils.colab import NEEDED, NEEDED_NO_DEPS

    pins = dict(line.split("==") for line in open("requirements.txt").read().splitlines()
                if "==" in line and not line.startswith("#"))
    for requirement in [*NEEDED.values(), *NEEDED_NO_DEPS.values()]:
        if "==" in requirement:
            name, version = requirement.split("==")
            if name in pins:
                assert pins[name] == version, f"colab.py installs {requirement}, requirements.txt pins {pins[name]}"
