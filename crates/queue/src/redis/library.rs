//! The Lua code (in `lua/`), loaded into Redis as one function library (`FUNCTION LOAD`):
//! `lua/prelude.lua` holds the helpers every function shares, and each other file is the body
//! of one function, called with `FCALL` with no `KEYS` and the key prefix as `ARGV[1]`.
//!
//! A library rather than `EVALSHA` scripts: a script re-runs its prelude (defining every
//! helper) on each call, which cost ~2.4 µs of Redis's time per call here, more than the
//! `XADD` a one-message submit does (5.7 µs per call as a script, 3.3 µs as a function).
//! Functions need Redis 7.0 or later.
//!
//! The library's name carries a hash of its code, so nodes running different versions each
//! find their own; a Redis that lost it (restarted without persistence, `FUNCTION FLUSH`)
//! gets it again on the next call that misses it.

use ::redis::{Cmd, RedisError, RedisResult, Value};

const PRELUDE: &str = include_str!("lua/prelude.lua");

/// The functions of the library.
#[derive(Debug, Clone, Copy)]
pub(super) enum Function {
    Ensure,
    Submit,
    ReceiveOpen,
    ReceiveClose,
    Ack,
    Nack,
    Extend,
    Release,
    Stats,
    DeadLetters,
}

impl Function {
    const ALL: [Function; 10] = [
        Function::Ensure,
        Function::Submit,
        Function::ReceiveOpen,
        Function::ReceiveClose,
        Function::Ack,
        Function::Nack,
        Function::Extend,
        Function::Release,
        Function::Stats,
        Function::DeadLetters,
    ];

    fn suffix(self) -> &'static str {
        match self {
            Function::Ensure => "ensure",
            Function::Submit => "submit",
            Function::ReceiveOpen => "receive_open",
            Function::ReceiveClose => "receive_close",
            Function::Ack => "ack",
            Function::Nack => "nack",
            Function::Extend => "extend",
            Function::Release => "release",
            Function::Stats => "stats",
            Function::DeadLetters => "dead_letters",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Function::Ensure => include_str!("lua/ensure.lua"),
            Function::Submit => include_str!("lua/submit.lua"),
            Function::ReceiveOpen => include_str!("lua/receive_open.lua"),
            Function::ReceiveClose => include_str!("lua/receive_close.lua"),
            Function::Ack => include_str!("lua/ack.lua"),
            Function::Nack => include_str!("lua/nack.lua"),
            Function::Extend => include_str!("lua/extend.lua"),
            Function::Release => include_str!("lua/release.lua"),
            Function::Stats => include_str!("lua/stats.lua"),
            Function::DeadLetters => include_str!("lua/dead_letters.lua"),
        }
    }
}

/// The library: its name and the code `FUNCTION LOAD` takes.
#[derive(Debug)]
pub(super) struct Library {
    name: String,
    code: String,
}

impl Library {
    pub(super) fn new() -> Self {
        // The prelude's `P` (the key prefix) is set by each function before anything else;
        // Redis runs one function at a time, so the shared upvalue is safe.
        let mut code = PRELUDE.replace("local P = ARGV[1]", "local P");
        for f in Function::ALL {
            code.push_str(&format!(
                "\nredis.register_function('{{lib}}_{}', function(KEYS, ARGV)\nP = ARGV[1]\n{}\nend)\n",
                f.suffix(),
                f.body()
            ));
        }
        let name = format!("agentmesh_queue_{:016x}", fnv1a(code.as_bytes()));
        let code = format!(
            "#!lua name={name}\n{}",
            code.replace("{lib}", name.as_str())
        );
        Self { name, code }
    }

    /// `FCALL {function} 0 {prefix}`: the caller appends the function's other arguments.
    pub(super) fn call(&self, f: Function, prefix: &str) -> Cmd {
        let mut cmd = ::redis::cmd("FCALL");
        cmd.arg(format!("{}_{}", self.name, f.suffix()))
            .arg(0)
            .arg(prefix);
        cmd
    }

    /// `FUNCTION LOAD REPLACE` of the library.
    pub(super) fn load_cmd(&self) -> Cmd {
        let mut cmd = ::redis::cmd("FUNCTION");
        cmd.arg("LOAD").arg("REPLACE").arg(&self.code);
        cmd
    }

    /// Runs `cmd` (from [`Library::call`]) on `con`, loading the library first if Redis does
    /// not have it.
    pub(super) async fn run<C: ::redis::aio::ConnectionLike>(
        &self,
        con: &mut C,
        cmd: &Cmd,
    ) -> RedisResult<Value> {
        match cmd.query_async(con).await {
            Err(e) if is_missing_function(&e) => {
                let _: String = self.load_cmd().query_async(con).await?;
                cmd.query_async(con).await
            }
            other => other,
        }
    }

    /// Loads the library (after a call found it missing).
    pub(super) async fn load<C: ::redis::aio::ConnectionLike>(
        &self,
        con: &mut C,
    ) -> RedisResult<()> {
        let _: String = self.load_cmd().query_async(con).await?;
        Ok(())
    }

    /// [`Library::run`] on a synchronous connection (where no runtime can be awaited: `Drop`).
    pub(super) fn run_sync(
        &self,
        con: &mut dyn ::redis::ConnectionLike,
        cmd: &Cmd,
    ) -> RedisResult<Value> {
        match cmd.query(con) {
            Err(e) if is_missing_function(&e) => {
                let _: String = self.load_cmd().query(con)?;
                cmd.query(con)
            }
            other => other,
        }
    }

    #[cfg(test)]
    fn code(&self) -> &str {
        &self.code
    }
}

/// Whether Redis answered that the function does not exist (the library is not loaded).
pub(super) fn is_missing_function(e: &RedisError) -> bool {
    e.code() == Some("ERR") && e.detail().is_some_and(|d| d.contains("Function not found"))
}

/// Whether one reply of a pipeline run with `ignore_errors` says the function does not exist.
pub(super) fn is_missing_function_reply(v: &Value) -> bool {
    match v {
        Value::ServerError(e) => is_missing_function(&RedisError::from(e.clone())),
        _ => false,
    }
}

/// 64-bit FNV-1a: names a version of the code, nothing more.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_registers_every_function_under_its_versioned_name() {
        let lib = Library::new();
        assert!(
            lib.code()
                .starts_with(&format!("#!lua name={}\n", lib.name))
        );
        for f in Function::ALL {
            let name = format!("{}_{}", lib.name, f.suffix());
            assert!(
                lib.code()
                    .contains(&format!("redis.register_function('{name}'")),
                "{name}"
            );
        }
        assert!(!lib.code().contains("local P = ARGV[1]"));
        assert!(!lib.code().contains("{lib}"));
        assert_eq!(Library::new().name, lib.name, "the name is stable");
    }
}
