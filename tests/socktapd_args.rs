//! socktapd's flags: a bad value is refused before anything is loaded or
//! bound, with exit code 2 and one line naming the flag. Needs no privilege
//! (nothing gets far enough to need one).

use std::process::{Command, Stdio};

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn socktapd(args: &[&str]) -> Outcome {
    socktapd_with_env(args, &[])
}

fn socktapd_with_env(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_socktapd"))
        .args(args)
        // Nothing from the environment: each case names its own flags.
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("running socktapd");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn bad_flags_exit_2_with_one_line_naming_the_flag() {
    let dir = std::env::temp_dir().join(format!("socktapd-args-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let empty = dir.join("empty.token");
    std::fs::write(&empty, "\n").unwrap();
    let junk = junk.to_str().unwrap();
    let empty = empty.to_str().unwrap();
    // Port 1 would need root to bind; none of these gets that far.
    let listen = ["--listen", "127.0.0.1:1"];
    let cases: &[(&[&str], &str)] = &[
        (&["--mode", "sideways"], "--mode"),
        (&["--listen", "nowhere"], "--listen"),
        (&["--ring-buffer-bytes", "1000"], "--ring-buffer-bytes"),
        (&["--ring-buffer-bytes", "12288"], "--ring-buffer-bytes"),
        (&["--wakeup-interval-us", "5000000"], "--wakeup-interval-us"),
        (&["--queue-events", "0"], "--queue-events"),
        (&["--reader-nice", "-21"], "--reader-nice"),
        (&["--reader-nice", "20"], "--reader-nice"),
        (&["--realtime-priority", "0"], "--realtime-priority"),
        (&["--realtime-priority", "100"], "--realtime-priority"),
        (&["--kretprobe-maxactive", "4097"], "--kretprobe-maxactive"),
        (&["--metrics-listen", "nowhere"], "--metrics-listen"),
        (&["--user", "no-such-user-socktap"], "--user"),
        (&["--socket-group", "no-such-group-socktap"], "--socket-group"),
        (&["--auth-token-file", "/nonexistent/token"], "--auth-token-file"),
        (&["--auth-token-file", empty], "--auth-token-file"),
        (&["--tls-cert", "/nonexistent/cert", "--tls-key", junk], "--tls-cert"),
        (&["--tls-cert", junk, "--tls-key", junk], "--tls-key"),
        (&["--tls-key", junk], "--tls-cert"),
    ];
    for (args, flag) in cases {
        let all: Vec<&str> = listen.iter().chain(args.iter()).copied().collect();
        let r = socktapd(&all);
        assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: one line: {}", r.stderr);
        assert!(r.stderr.starts_with("socktapd: "), "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(flag), "{args:?} names {flag}: {}", r.stderr);
        assert!(
            !r.stdout.contains("serving"),
            "{args:?}: refused before serving: {}",
            r.stdout
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn help_groups_the_flags() {
    let r = socktapd(&["--help"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let at = |s: &str| r.stdout.find(s).unwrap_or_else(|| panic!("{s} in {}", r.stdout));
    for (heading, flag) in [
        ("\nKernel:", "--ring-buffer-bytes"),
        ("\nSubscribers:", "--queue-events"),
        ("\nAccess:", "--auth-token-file"),
        ("\nTuning:", "--batch-interval-us"),
    ] {
        assert!(at(heading) < at(flag), "{flag} under {heading}");
    }
    assert!(at("--listen") < at("\nKernel:"), "the main options first");
    assert!(r.stdout.contains("Examples:"));
}

/// socktapd asks glibc for one malloc arena (peak RSS: docs/performance.md)
/// unless the environment names a count, which it then leaves alone.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn one_malloc_arena_unless_the_environment_names_a_count() {
    const SET: &str = "malloc: one arena for all threads";
    // A bad flag: it logs the arena choice, then stops before loading.
    let run = |env: &[(&str, &str)]| {
        let mut all = vec![("RUST_LOG", "debug")];
        all.extend_from_slice(env);
        let r = socktapd_with_env(&["--mode", "sideways"], &all);
        assert_eq!(r.code, Some(2), "{}", r.stderr);
        r.stderr
    };
    let stderr = run(&[]);
    assert!(stderr.contains(SET), "{stderr}");
    for env in [
        ("MALLOC_ARENA_MAX", "4"),
        ("GLIBC_TUNABLES", "glibc.malloc.arena_max=4"),
    ] {
        let stderr = run(&[env]);
        assert!(stderr.contains("socktapd: "), "{env:?}: {stderr}");
        assert!(!stderr.contains(SET), "{env:?} is left alone: {stderr}");
    }
}
