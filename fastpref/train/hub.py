"""``--push_to_hub``: the Hub and the token are checked at start-up (:func:`check_hub`), the
repository is made before training (:func:`create_repository`) and ``--output_dir`` is uploaded
at the end (:func:`push`), with ``huggingface_hub`` as in diffusers' scripts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

logger = logging.getLogger("fastpref.train")

# Not uploaded: the training state of each checkpoint (the final weights are at the folder's root)
# and what an interrupted save or rotation leaves, and the run's lock file.
IGNORE_PATTERNS = ["checkpoint-*", "*.partial", "*.old", "*.deleting", "step_*", "epoch_*", ".fastpref.lock"]


class HubError(ValueError):
    """The Hub cannot take this run's upload; the message says why and what to do."""


def repo_name(hub_model_id: Optional[str], output_dir) -> str:
    """The repository: ``--hub_model_id``, else the name of ``--output_dir`` (diffusers' rule)."""
    return hub_model_id or Path(output_dir).resolve().name


def check_hub(token: Optional[str]) -> str:
    """The user name the Hub knows ``token`` (or the saved login) by; :class:`HubError` when the
    Hub is switched off (``HF_HUB_OFFLINE``), unreachable, or knows no such token."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise HubError("the Hub is switched off here (HF_HUB_OFFLINE=1); unset it, or drop --push_to_hub")
    try:
        return HfApi(token=token).whoami()["name"]
    except Exception as error:  # offline, no token, a bad token, a proxy: all mean "cannot upload"
        raise HubError(
            f"cannot reach the Hub at {constants.ENDPOINT} with a valid token ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); log in with `hf auth login` or pass --hub_token"
        ) from None


def create_repository(hub_model_id: Optional[str], output_dir, token: Optional[str]) -> str:
    """Make (or find) the model repository before training; returns its full id."""
    from huggingface_hub import create_repo

    return create_repo(repo_id=repo_name(hub_model_id, output_dir), exist_ok=True, token=token).repo_id


def push(repo_id: str, output_dir, token: Optional[str]) -> None:
    """Upload ``output_dir`` (weights, model card, validation images, logs; not the checkpoints)."""
    from huggingface_hub import upload_folder

    upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message="End of training",
        ignore_patterns=IGNORE_PATTERNS,
        token=token,
    )
    logger.info("pushed %s to the Hub: %s", output_dir, repo_id)
