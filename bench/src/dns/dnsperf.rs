//! `--client dnsperf`: the real `dnsperf` (Debian package `dnsperf`) as
//! the load, once per phase, and its "Statistics:" block read back into a
//! [`Measured`].
//!
//! dnsperf is the field's standard DNS load generator (open loop per
//! socket: `-c` sockets, up to `-q` queries in flight in all, `-T`
//! threads), written in C, so the client's own cost per query is far below
//! the bench's tokio clients'. It sends real DNS queries, so it needs a
//! real DNS server behind (`--backend dnsmasq`).
//!
//! dnsperf counts the queries still in flight when its time limit ends as
//! lost (up to `-q` of them), so a few lost queries per phase are normal.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

use super::{DnsArgs, Measured};

const DNSPERF: &str = "dnsperf";

/// Whether `dnsperf` is on PATH; an error saying how to install it if not.
pub fn installed() -> Result<()> {
    if sluice_testkit::on_path(DNSPERF).is_some() {
        Ok(())
    } else {
        bail!("--client dnsperf: `{DNSPERF}` is not on PATH (apt-get install dnsperf)")
    }
}

/// dnsperf's query file: one line, `name A`. Removed on drop.
pub struct QueryFile(tempfile::NamedTempFile);

impl QueryFile {
    /// Queries for `name` (the one the backend answers).
    pub fn new(name: &str) -> Result<Self> {
        let mut f = tempfile::Builder::new()
            .prefix("sluice-bench-dnsperf-")
            .suffix(".txt")
            .tempfile()
            .context("creating dnsperf's query file")?;
        writeln!(f, "{name} A").context("writing dnsperf's query file")?;
        f.flush().context("writing dnsperf's query file")?;
        Ok(Self(f))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

/// One dnsperf run of `args.seconds` against `target`, from network
/// namespace `netns` when given (`ip netns exec`: the client pod of
/// `dns --netns`), else from this one.
pub async fn measure(
    target: SocketAddr,
    args: &DnsArgs,
    queries: &QueryFile,
    netns: Option<&str>,
) -> Result<Measured> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, DNSPERF]);
            c
        }
        None => Command::new(DNSPERF),
    };
    cmd.arg("-s")
        .arg(target.ip().to_string())
        .arg("-p")
        .arg(target.port().to_string())
        .arg("-d")
        .arg(queries.path())
        .arg("-l")
        .arg(args.seconds.to_string())
        .arg("-c")
        .arg(args.clients.to_string())
        .arg("-q")
        .arg(args.outstanding.to_string())
        .arg("-T")
        .arg(args.dnsperf_threads.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // dnsperf stops sending at its time limit and gives up on what is
    // still in flight; the margin covers its start-up and a loaded machine.
    let limit = Duration::from_secs_f64(args.seconds + 30.0);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .with_context(|| format!("dnsperf against {target} still running after {limit:?}"))?
        .context("running dnsperf (apt-get install dnsperf)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "dnsperf against {target} failed ({}){}",
            out.status,
            tails(&stdout, &stderr)
        );
    }
    let measured = parse(&stdout).map_err(|e| anyhow::anyhow!("{e}{}", tails(&stdout, &stderr)))?;
    if let Some(codes) = stat(&stdout, "Response codes:")
        && codes
            .split_whitespace()
            .any(|w| w.chars().all(|c| c.is_ascii_uppercase()) && w != "NOERROR")
    {
        eprintln!("dnsperf against {target}: not every answer was NOERROR: {codes}");
    }
    Ok(measured)
}

/// The last lines of dnsperf's stdout and stderr, for an error message.
fn tails(stdout: &str, stderr: &str) -> String {
    fn tail(s: &str) -> String {
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(12)..].join("\n")
    }
    format!(
        "\ndnsperf's stdout ends:\n{}\ndnsperf's stderr ends:\n{}",
        tail(stdout),
        tail(stderr)
    )
}

/// The text after `label` on the first line of the "Statistics:" block
/// that starts with it (leading blanks ignored).
fn stat<'a>(output: &'a str, label: &str) -> Option<&'a str> {
    let (_, block) = output.split_once("Statistics:")?;
    block
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .map(str::trim)
}

/// The first word after `label`, parsed; an error naming the line if it
/// is missing or unreadable.
fn number<T: std::str::FromStr>(output: &str, label: &str) -> Result<T> {
    let text =
        stat(output, label).with_context(|| format!("dnsperf's output has no `{label}` line"))?;
    text.split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .with_context(|| format!("dnsperf's `{label}` line is unreadable: `{text}`"))
}

/// dnsperf's "Statistics:" block as a [`Measured`].
pub fn parse(stdout: &str) -> Result<Measured> {
    if !stdout.contains("Statistics:") {
        bail!("dnsperf's output has no `Statistics:` line");
    }
    let answered: u64 = number(stdout, "Queries completed:")?;
    let lost: u64 = number(stdout, "Queries lost:")?;
    let elapsed: f64 = number(stdout, "Run time (s):")?;
    let qps: f64 = number(stdout, "Queries per second:")?;
    Ok(Measured {
        answered,
        lost,
        elapsed_s: (elapsed * 1000.0).round() / 1000.0,
        queries_per_s: qps.round(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// dnsperf 2.10.0's stdout of
    /// `dnsperf -s 127.0.0.1 -p 5301 -d q.txt -l 1 -c 4 -q 20`.
    const SAMPLE: &str = "DNS Performance Testing Tool
Version 2.10.0

[Status] Command line: dnsperf -s 127.0.0.1 -p 5301 -d q.txt -l 1 -c 4 -q 20
[Status] Sending queries (to 127.0.0.1:5301)
[Status] Started at: Tue Dec  1 06:11:29 2026
[Status] Stopping after 1.000000 seconds
[Status] Testing complete (time limit)

Statistics:

  Queries sent:         76738
  Queries completed:    76738 (100.00%)
  Queries lost:         0 (0.00%)

  Response codes:       NOERROR 76738 (100.00%)
  Average packet size:  request 35, response 51
  Run time (s):         1.000132
  Queries per second:   76727.871921

  Average Latency (s):  0.000204 (min 0.000007, max 0.002235)
  Latency StdDev (s):   0.000106
";

    #[test]
    fn the_statistics_block_of_a_real_run_parses() {
        let m = parse(SAMPLE).unwrap();
        assert_eq!((m.answered, m.lost), (76738, 0));
        assert_eq!(m.elapsed_s, 1.0);
        assert_eq!(m.queries_per_s, 76728.0);
        assert_eq!(
            stat(SAMPLE, "Response codes:"),
            Some("NOERROR 76738 (100.00%)")
        );
    }

    #[test]
    fn a_lossy_run_with_timeouts_parses() {
        // A run against a port nobody answers: the in-flight queries time
        // out at the end and are counted lost, and the rate is 0.
        let out = "[Timeout] Query timed out: msg id 0\n\
                   Statistics:\n\n  Queries sent:         10\n\
                   \x20 Queries completed:    0 (0.00%)\n\
                   \x20 Queries lost:         10 (100.00%)\n\n\
                   \x20 Response codes:       \n\
                   \x20 Run time (s):         0.300271\n\
                   \x20 Queries per second:   0.000000\n";
        let m = parse(out).unwrap();
        assert_eq!((m.answered, m.lost, m.queries_per_s), (0, 10, 0.0));
        assert_eq!(m.elapsed_s, 0.3);
    }

    #[test]
    fn truncated_or_garbled_output_is_an_error_naming_the_line() {
        let err = |s: &str| parse(s).unwrap_err().to_string();
        // Cut before the statistics (dnsperf killed, or an error banner).
        assert!(
            err("DNS Performance Testing Tool\nVersion 2.10.0\n").contains("`Statistics:`"),
            "{}",
            err("")
        );
        // Cut after the losses: no run time.
        let cut = &SAMPLE[..SAMPLE.find("  Response codes").unwrap()];
        assert!(err(cut).contains("`Run time (s):`"), "{}", err(cut));
        // A line that is there but does not hold a number.
        let garbled = SAMPLE.replace("76738 (100.00%)\n  Queries lost", "lots\n  Queries lost");
        let e = err(&garbled);
        assert!(
            e.contains("`Queries completed:`") && e.contains("lots"),
            "{e}"
        );
        let no_rate = SAMPLE.replace("Queries per second", "Queries per minute");
        assert!(err(&no_rate).contains("`Queries per second:`"));
        // A number before the block is not taken for the block's.
        let before = format!(
            "Queries lost: 5\n{}",
            SAMPLE.replace("  Queries lost:         0 (0.00%)\n", "")
        );
        assert!(err(&before).contains("`Queries lost:`"));
    }
}
