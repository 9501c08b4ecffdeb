//! The `LD_PRELOAD` shim behind [`RedisServerBuilder::clock_rate`]: `clock_rate.c`,
//! compiled once per process into a per-user cache directory.
//!
//! [`RedisServerBuilder::clock_rate`]: super::RedisServerBuilder::clock_rate

use std::ffi::OsString;
use std::fs;
use std::io::{self, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::HarnessError;

const SOURCE: &str = include_str!("clock_rate.c");
const FLAGS: [&str; 3] = ["-shared", "-fPIC", "-O2"];
const COMPILERS: [&str; 2] = ["cc", "gcc"];
/// The control file in the server's own directory.
const CONTROL_FILE: &str = "clock";
const STDERR_TAIL_LINES: usize = 20;
/// The shim re-reads its control file at the first clock read 10 ms (`CHECK_EVERY_NS`)
/// after its previous look; the rest is margin.
pub(super) const ADOPT_AFTER: Duration = Duration::from_millis(12);

// The same limits are in `clock_rate.c`, which rejects anything else.
const MIN_RATE: f64 = 1e-3;
const MAX_RATE: f64 = 1e3;
const MAX_OFFSET_MS: i64 = 1_000_000_000_000;

/// How fast a shimmed server's clocks run, and how far its wall clock is shifted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct ClockSetting {
    pub(super) rate: f64,
    pub(super) offset_ms: i64,
}

impl Default for ClockSetting {
    fn default() -> Self {
        Self {
            rate: 1.0,
            offset_ms: 0,
        }
    }
}

impl ClockSetting {
    pub(super) fn validate(self) -> Result<Self, HarnessError> {
        // `contains` is false for NaN, so this also rejects it.
        if !(MIN_RATE..=MAX_RATE).contains(&self.rate) {
            return Err(HarnessError::InvalidClockRate { rate: self.rate });
        }
        if self.offset_ms.unsigned_abs() > MAX_OFFSET_MS.unsigned_abs() {
            return Err(HarnessError::InvalidClockOffset {
                offset_ms: self.offset_ms,
            });
        }
        Ok(self)
    }

    /// The control file's text. `{}` never prints an f64 with an exponent, which the
    /// shim's parser does not accept.
    fn line(self) -> String {
        format!("{} {}\n", self.rate, self.offset_ms)
    }
}

/// Writes the control file of a running server, atomically: the shim reads either the
/// old text or the new one, never a mix.
pub(super) fn write_control(path: &Path, setting: ClockSetting) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, setting.line())?;
    fs::rename(&tmp, path)
}

/// Prepares a server launch in `dir`: writes its control file and returns the file's
/// path and the environment that loads the shim. A `LD_PRELOAD` of the caller's (from
/// `envs`, else inherited) is kept after the shim.
pub(super) fn launch_env(
    dir: &Path,
    setting: ClockSetting,
    envs: &[(OsString, OsString)],
) -> Result<(PathBuf, Vec<(OsString, OsString)>), HarnessError> {
    let shim = shim()?;
    let control = dir.join(CONTROL_FILE);
    write_control(&control, setting)?;
    let mut preload = shim.as_os_str().to_owned();
    let other = envs
        .iter()
        .rev()
        .find(|(key, _)| key == "LD_PRELOAD")
        .map(|(_, value)| value.clone())
        .or_else(|| std::env::var_os("LD_PRELOAD"))
        .filter(|value| !value.is_empty());
    if let Some(other) = other {
        preload.push(":");
        preload.push(other);
    }
    let env = [
        ("LD_PRELOAD", preload),
        ("QUORUMLOCK_CLOCK_RATE", setting.rate.to_string().into()),
        (
            "QUORUMLOCK_CLOCK_OFFSET_MS",
            setting.offset_ms.to_string().into(),
        ),
        ("QUORUMLOCK_CLOCK_CONTROL", control.clone().into_os_string()),
    ];
    Ok((
        control,
        env.into_iter()
            .map(|(key, value)| (OsString::from(key), value))
            .collect(),
    ))
}

/// Why the shim could not be built; kept so that later calls report it again.
struct BuildError {
    step: &'static str,
    detail: String,
}

impl BuildError {
    fn new(step: &'static str, detail: impl Into<String>) -> Self {
        Self {
            step,
            detail: detail.into(),
        }
    }
}

/// The compiled shim, built on first use. Concurrent callers wait for one build.
pub(super) fn shim() -> Result<&'static Path, HarnessError> {
    static SHIM: OnceLock<Result<PathBuf, BuildError>> = OnceLock::new();
    match SHIM.get_or_init(build) {
        Ok(path) => Ok(path),
        Err(error) => Err(HarnessError::ClockShim {
            step: error.step,
            detail: error.detail.clone(),
        }),
    }
}

fn build() -> Result<PathBuf, BuildError> {
    if !cfg!(target_os = "linux") {
        return Err(BuildError::new(
            "check the platform",
            "the clock shim needs Linux (LD_PRELOAD and the raw clock_gettime syscall)",
        ));
    }
    let dir =
        cache_dir().map_err(|detail| BuildError::new("prepare its cache directory", detail))?;
    // Named by what goes into it, so an edited source or flag list never reuses a stale
    // build, and unchanged ones are reused across processes and runs.
    let key = fnv1a([SOURCE, FLAGS.join(" ").as_str(), std::env::consts::ARCH]);
    let name = format!("clock_rate-{key:016x}.so");
    let path = dir.join(&name);
    // LD_PRELOAD splits its list at both.
    if path.as_os_str().to_string_lossy().contains([':', ' ']) {
        return Err(BuildError::new(
            "prepare its cache directory",
            format!(
                "{} contains ':' or ' ', which LD_PRELOAD cannot hold; set TMPDIR to a \
                 plainer directory",
                path.display()
            ),
        ));
    }
    if path.is_file() {
        return Ok(path);
    }
    // Processes building at once each write their own file; the renames are atomic, so
    // a reader sees one complete build or another.
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let built = compile(&tmp).and_then(|()| {
        fs::rename(&tmp, &path).map_err(|error| {
            BuildError::new(
                "install it",
                format!("renaming {} to {}: {error}", tmp.display(), path.display()),
            )
        })
    });
    if built.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    built.map(|()| path)
}

/// `$TMPDIR/quorumlock-clock-shim-<euid>`, private to this user: any library in it is
/// preloaded into our servers.
fn cache_dir() -> Result<PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let uid = euid();
    let dir = std::env::temp_dir().join(format!("quorumlock-clock-shim-{uid}"));
    match fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(error) if error.kind() == ErrorKind::AlreadyExists => {}
        Err(error) => return Err(format!("creating {}: {error}", dir.display())),
    }
    let meta = fs::symlink_metadata(&dir).map_err(|error| format!("{}: {error}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is not a directory owned by uid {uid} and writable by it alone; remove it",
            dir.display()
        ));
    }
    Ok(dir)
}

#[allow(unsafe_code)] // libc::geteuid: std has no way to ask.
fn euid() -> u32 {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn compile(target: &Path) -> Result<(), BuildError> {
    let mut failures = Vec::new();
    for compiler in COMPILERS {
        let spawned = Command::new(compiler)
            .args(FLAGS)
            .args(["-x", "c", "-", "-o"])
            .arg(target)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(error) if error.kind() == ErrorKind::NotFound => continue,
            Err(error) => {
                failures.push(format!("`{compiler}` could not run: {error}"));
                continue;
            }
        };
        // The source is far smaller than a pipe buffer, so this cannot block on a
        // compiler busy writing errors. A write error shows up as a failed compile.
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(SOURCE.as_bytes());
        }
        match child.wait_with_output() {
            Ok(output) if output.status.success() => return Ok(()),
            Ok(output) => failures.push(format!(
                "`{compiler} {} -x c - -o {}` failed ({}):\n{}",
                FLAGS.join(" "),
                target.display(),
                output.status,
                stderr_tail(&output.stderr),
            )),
            Err(error) => failures.push(format!("`{compiler}` could not run: {error}")),
        }
    }
    if failures.is_empty() {
        Err(BuildError::new(
            "find a C compiler",
            format!(
                "neither {} is on PATH; install one (Debian/Ubuntu: `apt-get install -y \
                 gcc`)",
                COMPILERS.map(|c| format!("`{c}`")).join(" nor ")
            ),
        ))
    } else {
        Err(BuildError::new(
            "compile src/testing/clock_rate.c",
            failures.join("\n"),
        ))
    }
}

fn stderr_tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join("\n")
}

/// 64-bit FNV-1a: a cache key that, unlike std's hasher, is the same in every build.
fn fnv1a<'a>(parts: impl IntoIterator<Item = &'a str>) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for part in parts {
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        for &byte in part.as_bytes().iter().chain(&[0xff]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use std::thread;
    use std::time::Instant;

    use super::*;
    use crate::testing::RedisServer;

    #[test]
    fn rates_print_as_the_shim_parses_them() {
        for rate in [
            MIN_RATE,
            MAX_RATE,
            1.0,
            0.5,
            1.0 / 3.0,
            0.001_234_567_890_123_456_7,
        ] {
            let line = ClockSetting {
                rate,
                offset_ms: -MAX_OFFSET_MS,
            }
            .line();
            assert!(!line.contains(['e', 'E']), "{line:?}");
            let (printed, offset) = line.trim_end().split_once(' ').expect("two fields");
            assert_eq!(printed.parse::<f64>(), Ok(rate));
            assert_eq!(offset.parse::<i64>(), Ok(-MAX_OFFSET_MS));
            // The shim's read buffer holds 128 bytes.
            assert!(line.len() < 128, "{line:?}");
        }
    }

    #[test]
    fn validate_rejects_what_the_shim_would() {
        for rate in [f64::NAN, f64::INFINITY, -1.0, 0.0, 0.000_999, 1000.001] {
            let setting = ClockSetting { rate, offset_ms: 0 };
            assert!(
                matches!(
                    setting.validate(),
                    Err(HarnessError::InvalidClockRate { .. })
                ),
                "{rate}"
            );
        }
        for offset_ms in [i64::MIN, -MAX_OFFSET_MS - 1, MAX_OFFSET_MS + 1] {
            let setting = ClockSetting {
                rate: 1.0,
                offset_ms,
            };
            assert!(
                matches!(
                    setting.validate(),
                    Err(HarnessError::InvalidClockOffset { .. })
                ),
                "{offset_ms}"
            );
        }
        let edge = ClockSetting {
            rate: MAX_RATE,
            offset_ms: -MAX_OFFSET_MS,
        };
        assert_eq!(edge.validate().ok(), Some(edge));
    }

    #[test]
    fn the_cache_key_separates_its_parts() {
        assert_ne!(fnv1a(["ab", "c"]), fnv1a(["a", "bc"]));
        assert_eq!(fnv1a(["x"]), fnv1a(["x"]));
    }

    #[test]
    fn concurrent_callers_share_one_build() {
        let paths: Vec<PathBuf> = thread::scope(|scope| {
            let builds: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| shim().map(Path::to_path_buf)))
                .collect();
            builds
                .into_iter()
                .map(|build| build.join().expect("thread").expect("shim"))
                .collect()
        });
        assert!(paths.windows(2).all(|pair| pair[0] == pair[1]), "{paths:?}");
        assert!(paths[0].is_file());
    }

    /// `(real instant, server microseconds)`, the instant taken mid-round-trip.
    fn sample(connection: &mut redis::Connection) -> (Instant, i64) {
        let sent = Instant::now();
        let (seconds, micros): (i64, i64) = redis::cmd("TIME").query(connection).expect("TIME");
        let received = Instant::now();
        (sent + (received - sent) / 2, seconds * 1_000_000 + micros)
    }

    fn rate_over(connection: &mut redis::Connection, window: Duration) -> f64 {
        let (real0, server0) = sample(connection);
        thread::sleep(window);
        let (real1, server1) = sample(connection);
        (server1 - server0) as f64 / (real1 - real0).as_micros() as f64
    }

    /// Replaces the control file as `write_control` does, with any text.
    fn write_raw(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, text).expect("write");
        fs::rename(&tmp, path).expect("rename");
    }

    #[test]
    fn a_bad_control_file_keeps_the_last_good_setting() {
        let server = RedisServer::builder()
            .clock_rate(2.0)
            .start()
            .expect("start");
        let control = server
            .clock_control_path()
            .expect("control file")
            .to_owned();
        let client = redis::Client::open(server.url()).expect("client");
        let mut connection = client.get_connection().expect("connect");

        let long = format!("5 {}", "0".repeat(200));
        // Each would change the rate if it were taken, which the next window would show.
        let bad = [
            "",
            "junk\n",
            "0 0\n",
            "-1 0\n",
            "nan 0\n",
            "inf\n",
            "1e2 0\n",
            "5 x\n",
            "5 0 0\n",
            "5 1.5\n",
            "5 9999999999999\n",
            "0.0009\n",
            "1000.5\n",
            ".\n",
            "5,0\n",
            &long,
        ];
        for text in bad {
            write_raw(&control, text);
            // The next clock read after 10 ms makes the shim look at the file.
            thread::sleep(ADOPT_AFTER);
            sample(&mut connection);
            let rate = rate_over(&mut connection, Duration::from_millis(40));
            assert!((1.5..2.5).contains(&rate), "rate {rate} after {text:?}");
        }

        // No offset means 0: the file is otherwise as `write_control` writes it.
        write_raw(&control, " 0.5 \n");
        thread::sleep(ADOPT_AFTER);
        sample(&mut connection);
        let rate = rate_over(&mut connection, Duration::from_millis(300));
        assert!((0.425..0.575).contains(&rate), "rate {rate} after 0.5");
    }
}
