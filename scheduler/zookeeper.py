"""A real ZooKeeper server on 127.0.0.1, for the tests and the local-cluster launcher.

Runs the installed ZooKeeper jars (``$ZOOKEEPER_HOME`` or Debian's ``zookeeper`` package)
with ``java ... org.apache.zookeeper.server.ZooKeeperServerMain``, standalone. Invariants:

- everything the server writes lives in the directory it is given: its zoo.cfg, data,
  logging configuration, log file, stdout and stderr; nothing goes to the console;
- it listens on 127.0.0.1 only, on a port chosen once and kept across restarts, so a
  connect string stays valid when a chaos test restarts the server;
- ``tickTime=500`` so sessions can be as short as 1 s; four-letter words are enabled; the
  admin HTTP server is disabled (it would need another port);
- `start` returns only once ``ruok`` answers ``imok`` and ``srvr`` reports standalone
  mode, within its timeout; `stop` stops it by pid and is idempotent.

This module does not speak the ZooKeeper protocol (scheduler/coord.py owns kazoo); it
only uses the plain-text four-letter words to check health.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from xml.sax.saxutils import escape

from scheduler.deadline import free_port, poll_for
from scheduler.process import Process, spawn

__all__ = [
    "ZooKeeperInstall",
    "ZooKeeperNotInstalled",
    "ZooKeeperServer",
    "ZooKeeperStartError",
    "find_installation",
    "four_letter_word",
]

log = logging.getLogger(__name__)

MAIN_CLASS = "org.apache.zookeeper.server.ZooKeeperServerMain"
DEBIAN_JAR = Path("/usr/share/java/zookeeper.jar")
# Debian's zookeeper.jar names its dependencies in its manifest's Class-Path but no SLF4J
# binding (without one the server logs nothing); these come with liblog4j1.2-java and
# libslf4j-java, which libzookeeper-java depends on.
DEBIAN_LOGGING_JARS = ("slf4j-log4j12.jar", "log4j-1.2.jar")
# Without these the server cannot start (the manifest also names jline.jar, which only the
# command-line client needs and Debian does not ship with it).
DEBIAN_REQUIRED_JARS = ("zookeeper-jute.jar", "slf4j-api.jar")

INSTALL_HINT = (
    "ZooKeeper is not installed: run 'sudo apt-get install zookeeper' "
    "(scripts/bootstrap does it as root) or set ZOOKEEPER_HOME"
)


class ZooKeeperNotInstalled(RuntimeError):
    """No usable ZooKeeper (or Java) installation; the message says what to install."""


class ZooKeeperStartError(RuntimeError):
    """The server process exited while starting; the message points at its log."""


@dataclass(frozen=True)
class ZooKeeperInstall:
    """Where the server's code is: the java binary and the classpath to run it with."""

    java: Path
    classpath: tuple[Path, ...]
    source: str  # for messages: "ZOOKEEPER_HOME=..." or "Debian package zookeeper"


def _find_java(environ: Mapping[str, str]) -> Path:
    java_home = environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return Path(java_home) / "bin" / "java"
    found = shutil.which("java", path=environ.get("PATH"))
    if found is None:
        raise ZooKeeperNotInstalled(
            "Java is not installed: run 'sudo apt-get install default-jre-headless' "
            "or set JAVA_HOME"
        )
    return Path(found)


def _manifest_class_path(jar: Path) -> list[Path]:
    """The jars named in `jar`'s manifest Class-Path (continuation lines joined)."""
    with zipfile.ZipFile(jar) as archive:
        try:
            manifest = archive.read("META-INF/MANIFEST.MF").decode("utf-8")
        except KeyError:
            return []
    joined = manifest.replace("\r\n", "\n").replace("\n ", "")
    for line in joined.splitlines():
        if line.startswith("Class-Path:"):
            entries = line.removeprefix("Class-Path:").split()
            return [jar.parent / e for e in entries]  # absolute entries stay absolute
    return []


def _from_home(home: Path) -> list[Path]:
    jars = sorted((home / "lib").glob("*.jar")) + sorted(home.glob("*.jar"))
    if not any(j.name.startswith("zookeeper") for j in jars):
        raise ZooKeeperNotInstalled(
            f"ZOOKEEPER_HOME={home} holds no zookeeper jar in lib/ or at its top: "
            "point it at an unpacked ZooKeeper release, or unset it and run "
            "'sudo apt-get install zookeeper'"
        )
    return jars


def _from_debian(jar: Path) -> list[Path]:
    deps = _manifest_class_path(jar)
    present = [d for d in deps if d.is_file()]
    missing = [d.name for d in deps if not d.is_file()]
    if missing:
        log.debug("zookeeper.jar manifest names missing jars: %s", missing)
    for required in DEBIAN_REQUIRED_JARS:
        if not (jar.parent / required).is_file():
            raise ZooKeeperNotInstalled(
                f"ZooKeeper is incomplete ({jar.parent / required} is missing): "
                "run 'sudo apt-get install --reinstall zookeeper libzookeeper-java' "
                "or set ZOOKEEPER_HOME"
            )
    logging_jars = [jar.parent / n for n in DEBIAN_LOGGING_JARS if (jar.parent / n).is_file()]
    return [jar, *present, *logging_jars]


def find_installation(environ: Mapping[str, str] | None = None) -> ZooKeeperInstall:
    """Locate java and ZooKeeper's jars, or raise ZooKeeperNotInstalled.

    ``$ZOOKEEPER_HOME`` wins when set (jars in ``$ZOOKEEPER_HOME/lib`` and at its top);
    otherwise Debian's ``/usr/share/java/zookeeper.jar`` with the jars its manifest names
    and an SLF4J binding for log4j 1.2.
    """
    env = os.environ if environ is None else environ
    home = env.get("ZOOKEEPER_HOME")
    if home:
        classpath, source = _from_home(Path(home)), f"ZOOKEEPER_HOME={home}"
    elif DEBIAN_JAR.is_file():
        classpath, source = _from_debian(DEBIAN_JAR), "Debian package zookeeper"
    else:
        raise ZooKeeperNotInstalled(INSTALL_HINT)
    return ZooKeeperInstall(java=_find_java(env), classpath=tuple(classpath), source=source)


def four_letter_word(address: str, word: str, *, timeout: float = 2.0) -> str:
    """Send a four-letter word (``ruok``, ``srvr``, ``mntr``...) to "host:port", return the
    reply. Raises OSError if the server cannot be reached within `timeout`."""
    host, _, port = address.rpartition(":")
    chunks: list[bytes] = []
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(word.encode("ascii"))
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


_LOG4J = """\
log4j.rootLogger=INFO, FILE
log4j.appender.FILE=org.apache.log4j.FileAppender
log4j.appender.FILE.File={log}
log4j.appender.FILE.layout=org.apache.log4j.PatternLayout
log4j.appender.FILE.layout.ConversionPattern=%d{{ISO8601}} %-5p [%t:%C{{1}}@%L] - %m%n
"""

_LOGBACK = """\
<configuration>
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>{log}</file>
    <encoder><pattern>%d{{ISO8601}} %-5level [%thread:%logger{{0}}] - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="FILE"/></root>
</configuration>
"""


class ZooKeeperServer:
    """One standalone ZooKeeper server living in `directory`; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        *,
        install: ZooKeeperInstall | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        heap: str = "256m",
        force_sync: bool = False,
    ) -> None:
        # force_sync=False: ZooKeeper still writes every transaction before acknowledging
        # it, but skips fsync; a killed server loses nothing (the page cache survives it),
        # only a machine crash could. That keeps tests fast on slow disks.
        self.directory = Path(directory)
        self.host = host
        self._install = install
        self._port = port
        self._port_is_ours = port is None
        self._heap = heap
        self._force_sync = force_sync
        self._process: Process | None = None

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def config_path(self) -> Path:
        return self.directory / "zoo.cfg"

    @property
    def log_path(self) -> Path:
        return self.directory / "zookeeper.log"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("ZooKeeper server has not been started: no port yet")
        return self._port

    @property
    def address(self) -> str:
        """ "127.0.0.1:PORT", the connect string (without chroot)."""
        return f"{self.host}:{self.port}"

    @property
    def process(self) -> Process:
        """The current (or last) server process, e.g. for a chaos test to SIGSTOP it."""
        if self._process is None:
            raise RuntimeError("ZooKeeper server has not been started")
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self._process is not None and self._process.alive()

    def __repr__(self) -> str:
        port = self._port if self._port is not None else "?"
        return f"ZooKeeperServer({self.host}:{port}, dir={self.directory})"

    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        settings: dict[str, object] = {
            "tickTime": 500,
            "minSessionTimeout": 1000,
            "maxSessionTimeout": 30000,
            "clientPortAddress": self.host,
            "clientPort": self.port,
            "dataDir": self.data_dir,
            "4lw.commands.whitelist": "*",
            "admin.enableServer": "false",
            "autopurge.snapRetainCount": 3,
            "autopurge.purgeInterval": 1,
            "maxClientCnxns": 0,  # every test client connects from 127.0.0.1
            "preAllocSize": 4096,  # KiB per transaction log file, instead of 64 MiB
            "forceSync": "yes" if self._force_sync else "no",
        }
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        (self.directory / "log4j.properties").write_text(_LOG4J.format(log=self.log_path))
        (self.directory / "logback.xml").write_text(_LOGBACK.format(log=escape(str(self.log_path))))

    def _argv(self, install: ZooKeeperInstall) -> Sequence[str]:
        return [
            str(install.java),
            f"-Xmx{self._heap}",
            "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            f"-Dzookeeper.log.dir={self.directory}",
            f"-Dlog4j.configuration=file:{self.directory / 'log4j.properties'}",
            f"-Dlogback.configurationFile={self.directory / 'logback.xml'}",
            "-cp",
            os.pathsep.join(str(p) for p in install.classpath),
            MAIN_CLASS,
            str(self.config_path),
        ]

    def _ready(self, process: Process) -> bool:
        code = process.returncode
        if code is not None:
            raise ZooKeeperStartError(
                f"ZooKeeper exited with status {code} while starting on {self.address}; "
                f"see {self.log_path} and {process.stderr_path}"
            )
        try:
            if four_letter_word(self.address, "ruok", timeout=1.0) != "imok":
                return False
            if "Mode: standalone" not in four_letter_word(self.address, "srvr", timeout=1.0):
                return False
            # Is it ours? A server that cannot bind its port may keep running without a
            # listener, while another server on that port answers for it.
            conf = four_letter_word(self.address, "conf", timeout=1.0)
            return f"dataDir={self.data_dir}{os.sep}" in conf
        except OSError:
            return False

    def _port_free(self, port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As the JVM does: connections in TIME_WAIT from a previous run don't count.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, port))
            except OSError:
                return False
            return True

    def _choose_port(self) -> int:
        if self._port is not None and self._port_free(self._port):
            return self._port
        if not self._port_is_ours and self._port is not None:
            raise ZooKeeperStartError(f"cannot start ZooKeeper: {self.address} is in use")
        if self._port is not None:
            log.info("zookeeper port=%s was taken since the last start; moving", self._port)
        return free_port(self.host)

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait (at most `timeout` s) until it serves requests.

        The port is kept across restarts unless it was chosen here and has been taken
        since; a port given to the constructor that is in use is an error.
        """
        if self.alive():
            raise RuntimeError(f"{self!r} is already running (pid {self.pid})")
        install = self._install or find_installation()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._port = self._choose_port()
        self._write_config()
        process = spawn(self._argv(install), name="zookeeper", log_dir=self.directory)
        self._process = process
        try:
            poll_for(
                functools.partial(self._ready, process),
                timeout,
                interval=0.1,
                what=f"ZooKeeper on {self.address} to answer ruok and report standalone",
            )
        except ZooKeeperStartError:
            process.terminate(grace=1.0)
            raise
        except TimeoutError as e:
            process.terminate(grace=2.0)
            raise TimeoutError(f"{e}; see {self.log_path}") from None
        log.info(
            "zookeeper started address=%s pid=%s dir=%s from=%s",
            self.address,
            process.pid,
            self.directory,
            install.source,
        )

    def stop(self, grace: float = 10.0) -> None:
        """Stop the server by pid (SIGTERM, then SIGKILL after `grace`). Idempotent."""
        if self._process is None or not self._process.alive():
            if self._process is not None:
                self._process.terminate(grace)  # reap a server that died by itself
            return
        code = self._process.terminate(grace)
        log.info("zookeeper stopped address=%s pid=%s status=%s", self.address, self.pid, code)

    def __enter__(self) -> ZooKeeperServer:
        if not self.alive():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
