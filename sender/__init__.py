"""sender: an outbound email MTA on trio.

The public API is re-exported here; everything else lives in private or concern-named modules.
"""

from .config import Config as Config, ConfigError as ConfigError, load_config as load_config, parse_config as parse_config
from .engine import Engine as Engine, EngineStatistics as EngineStatistics, SpoolFull as SpoolFull, Suppressed as Suppressed
from .engine import QuotaExceeded as QuotaExceeded, TooManyRecipients as TooManyRecipients
from .errors import (
    ConnectError as ConnectError,
    DNSError as DNSError,
    SendError as SendError,
    SessionError as SessionError,
    UsageError as UsageError,
)
from .journal import Journal as Journal, JournalCorrupt as JournalCorrupt
from .model import Reply as Reply
from .sink import Sink as Sink

__all__ = [
    "Config", "ConfigError", "load_config", "parse_config",
    "Engine", "EngineStatistics", "SpoolFull", "Suppressed", "QuotaExceeded", "TooManyRecipients",
    "SendError", "ConnectError", "SessionError", "DNSError", "UsageError",
    "Journal", "JournalCorrupt", "Reply", "Sink",
]
__version__ = "0.1.0"
