"""Weights & Biases logging that works without a W&B account.

``wandb.init`` without credentials either prompts (and waits) or fails. The library's configs log to W&B,
so that a first run on a machine with no W&B login neither hangs nor crashes, :func:`resolve_wandb_mode`
switches W&B to offline mode (``WANDB_MODE=offline``) with one message when no API key is configured
and ``WANDB_MODE`` is not set. Offline runs are written under ``<save_dir>/wandb/offline-run-*`` and can
be uploaded later with ``wandb sync``. Setting ``WANDB_MODE`` yourself (``online``, ``offline``,
``disabled``) always wins.

The ``gpcps`` command applies this to any :class:`lightning.pytorch.loggers.WandbLogger` in a config;
:class:`OfflineFallbackWandbLogger` applies it in any Lightning program (a plain ``Trainer`` or a user's
own ``LightningCLI``). It has its own name so that ``--trainer.logger WandbLogger`` stays unambiguous.
Both also pass W&B only the settings that do not make it warn (:func:`quiet_wandb_init`).
"""

from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lightning.pytorch.loggers import WandbLogger

from gpcps_lightning._lightning_internals import pending_wandb_init

__all__ = ["OfflineFallbackWandbLogger", "quiet_wandb_init", "resolve_wandb_mode", "wandb_api_key_configured"]

_DEFAULT_HOST = "https://api.wandb.ai"


def _netrc_path() -> Path | None:
    # The order wandb itself uses: $NETRC, then ~/.netrc, then ~/_netrc.
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    for name in ("~/.netrc", "~/_netrc"):
        path = Path(name).expanduser()
        if path.exists():
            return path
    return None


def wandb_api_key_configured() -> bool:
    """Whether W&B credentials are available without asking the user.

    Looks where ``wandb`` looks: the ``WANDB_API_KEY`` or ``WANDB_IDENTITY_TOKEN_FILE`` environment
    variables, then a netrc entry (``$NETRC``, ``~/.netrc``, ``~/_netrc``; ``wandb login`` writes it) for
    the W&B host (``WANDB_BASE_URL``, default ``api.wandb.ai``). The key is not checked against the server.

    Returns:
        ``True`` if a key (or identity token) is configured.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = _netrc_path()
    if path is None or not path.is_file():
        return False
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or _DEFAULT_HOST).hostname or ""
    try:
        auth = netrc.netrc(os.fspath(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError):
        # wandb would fail on an unreadable netrc as well; treat it as "no key" and go offline.
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode(save_dir: str | os.PathLike[str] | None = None) -> str:
    """Choose the W&B mode before a run starts, switching to offline mode when there is no login.

    If ``WANDB_MODE`` is set, it is left as it is. Otherwise, without configured credentials (see
    :func:`wandb_api_key_configured`), ``WANDB_MODE`` is set to ``offline`` for this process and one
    line on stderr says so and how to upload or switch off W&B.

    Args:
        save_dir: Where the W&B run folder will be written, shown in the message.

    Returns:
        The mode W&B will use: the value of ``WANDB_MODE`` (``"online"`` when it is unset and a key is
        configured).
    """
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if wandb_api_key_configured():
        return "online"
    os.environ["WANDB_MODE"] = "offline"
    where = Path(save_dir or ".") / "wandb"
    print(
        f"gpcps: no W&B API key found (WANDB_API_KEY or `wandb login`), so W&B logs offline to {where}/; "
        "upload later with `wandb sync`, or set WANDB_MODE=disabled or --trainer.logger=CSVLogger "
        "to switch it off.",
        file=sys.stderr,
        flush=True,
    )
    return "offline"


def quiet_wandb_init(logger: WandbLogger) -> None:
    """Adjust what a ``WandbLogger`` will pass to ``wandb.init`` so that W&B does not warn about defaults.

    Lightning (2.6) always passes ``anonymous=None``, which W&B (0.19 and later) answers with "The
    anonymous setting has no effect"; it is left out unless the user set it. W&B looks for the git
    repository from the run folder (``save_dir``) before creating it and warns "git root ... does not
    exist" on a first run; the folder is created here, so W&B still records the commit when there is
    a repository. Call it before the logger's ``experiment`` is first used.

    Args:
        logger: The logger, before its run starts (changed in place; a started run is left alone).
    """
    init = pending_wandb_init(logger)
    if init is None:
        return
    if init.get("anonymous") is None:
        init.pop("anonymous", None)
    if init.get("dir"):
        os.makedirs(os.fspath(init["dir"]), exist_ok=True)


class OfflineFallbackWandbLogger(WandbLogger):
    """Lightning's :class:`~lightning.pytorch.loggers.WandbLogger`, going offline when there is no W&B login.

    Accepts exactly the arguments of Lightning's logger (``project``, ``name``, ``save_dir``, ``offline``,
    ``log_model``, ...). When ``offline`` is ``False``, ``WANDB_MODE`` is unset and no API key is
    configured, it switches to offline mode with a one-line message (see :func:`resolve_wandb_mode`)
    instead of prompting for a login or failing.

    Args:
        *args: Positional arguments of Lightning's ``WandbLogger``.
        **kwargs: Keyword arguments of Lightning's ``WandbLogger``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("offline", False):
            save_dir = kwargs.get("save_dir") or kwargs.get("dir")
            if resolve_wandb_mode(save_dir) in ("offline", "dryrun") and kwargs.get("log_model"):
                raise ValueError(
                    "WandbLogger(log_model=...) uploads checkpoints, which W&B cannot do offline: "
                    "log in with `wandb login` (or set WANDB_API_KEY) or set log_model=False."
                )
        super().__init__(*args, **kwargs)
        quiet_wandb_init(self)
