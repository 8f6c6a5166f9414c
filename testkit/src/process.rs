//! Processes as `/proc` shows them: the live children of a process, for a
//! bench phase that counts a server's workers' CPU and for tests that
//! check nothing was left running.

/// One live process: its pid and its command name (`comm`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub comm: String,
}

/// The live (not zombie) processes whose parent is `pid`. Empty when
/// `/proc` cannot be read; a process that exits during the walk is left
/// out.
pub fn children(pid: u32) -> Vec<Process> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let p: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let (comm, state, ppid) = parse_stat(&stat)?;
            (ppid == pid && state != "Z").then_some(Process { pid: p, comm })
        })
        .collect()
}

/// Whether `pid` is a live process: there, and not a zombie.
pub fn is_live(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_stat(&s).map(|(_, state, _)| state != "Z"))
        .unwrap_or(false)
}

/// `comm`, state and parent pid from a `/proc/<pid>/stat` line. The
/// command name sits in parentheses and may itself hold spaces and
/// parentheses, so the fields after it are found from the last `") "`.
fn parse_stat(stat: &str) -> Option<(String, &str, u32)> {
    let (head, rest) = stat.rsplit_once(") ")?;
    let comm = head.split_once(" (")?.1.to_string();
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((comm, state, ppid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn parse_stat_takes_a_name_with_spaces_and_parentheses() {
        let line = "4242 (nginx: (worker) x) S 4200 4200 4200 0 -1 4194560 12 0";
        assert_eq!(
            parse_stat(line),
            Some(("nginx: (worker) x".to_string(), "S", 4200))
        );
        assert_eq!(parse_stat("4242 nginx S 1"), None);
        assert_eq!(parse_stat("4242 (x) S notapid"), None);
    }

    #[test]
    fn children_lists_a_live_child_and_not_a_zombie() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let (me, pid) = (std::process::id(), child.id());
        let live = children(me);
        assert!(is_live(pid));
        child.kill().unwrap();
        // Not waited for yet: a zombie until `wait`, at most 5 s to get there.
        let stat = format!("/proc/{pid}/stat");
        let zombie = (0..500).any(|_| {
            let z = std::fs::read_to_string(&stat)
                .ok()
                .and_then(|s| parse_stat(&s).map(|(_, st, _)| st == "Z"))
                .unwrap_or(false);
            if !z {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            z
        });
        let after = children(me);
        child.wait().unwrap();
        let kid = live.iter().find(|p| p.pid == pid);
        assert_eq!(kid.map(|p| p.comm.as_str()), Some("sleep"), "{live:?}");
        assert!(zombie, "the killed child never showed as a zombie");
        assert!(after.iter().all(|p| p.pid != pid), "{after:?}");
        assert!(!is_live(pid), "a zombie counts as not live");
    }
}
