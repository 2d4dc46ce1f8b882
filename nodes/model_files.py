"""The model files a prompt names, checked when ComfyUI validates the prompt.

ComfyUI 0.3.75 compares a dropdown's value with its options only for nodes of its old API (its
validation matches list-typed inputs; a V3 ``io.Combo`` is typed "COMBO"), so a Likeness picker
naming a file that is not there passed validation and failed only when its node ran, after the
files before it had loaded: a user learnt of one missing file per Run. Each picker's node returns
``missing_file`` (or ``missing_insightface_pack``) from its ``validate_inputs``, so POST /prompt
names every missing file of every node in one answer, beside ComfyUI's own loaders' "Value not in
list", each with its folder and, for the files the shipped workflows load, the publisher's link.

ComfyUI repeats a node's message once per input its ``validate_inputs`` takes, prefixed with that
input's name: a message names every file of its node, so each of those lines is whole on its own.
"""

from __future__ import annotations


def publisher_link(folder: str, name: str) -> str | None:
    """The publisher's URL of a file the shipped workflows load (install.MODEL_FILES), else None."""
    from .. import install  # the one table of shipped model files; standard library only

    return next((model["url"] for model in install.MODEL_FILES
                 if model["directory"] == folder and model["name"] == name), None)


def missing_file(folder: str, input_name: str, name: str, listed: list[str], also_accepted: tuple[str, ...] = ()
                 ) -> bool | str:
    """True when ``name`` (the value of ``input_name``) is in ``listed`` (the folder's files) or
    ``also_accepted`` (e.g. "none"); otherwise a message naming the file, its folder, and where to
    get it."""
    if name in listed or name in also_accepted:
        return True
    where = f"models/{folder}/{name}"
    link = publisher_link(folder, name)
    if link is not None:
        return f"{input_name}: {where} is missing; download {link} and save it as {where}"
    found = ", ".join(listed[:8]) + (", ..." if len(listed) > 8 else "") if listed else "no files"
    accepted = f"{', '.join(repr(a) for a in also_accepted)} or " if also_accepted else ""
    return (f"{input_name}: {where} is missing (models/{folder}/ holds {found}); choose {accepted}a file there, "
            f"or put {name} in that folder")


def join_problems(*results: bool | str) -> bool | str:
    """True when every check passed, else their messages in one."""
    return "; ".join(r for r in results if r is not True) or True


def missing_insightface_pack(name: str) -> bool | str:
    """True when insightface pack ``name`` is in place; otherwise where its files go and the zip to get."""
    from ..attention.faces.insightface_backend import PACKS, find_pack

    if name not in PACKS:
        return f"model_name: {name!r} is not a pack Likeness loads; choose one of {', '.join(PACKS)}"
    try:
        find_pack(name)
    except ValueError as error:
        return str(error)
    return True
