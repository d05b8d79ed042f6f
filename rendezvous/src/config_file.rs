//! `rendezvous serve --config FILE`: every `serve` option from a TOML file.
//!
//! The file's keys are the option names without their leading `--` (`listen`,
//! `max-connections`, `cluster`, ...), at the top level. Rather than a second description of
//! the options (which would drift from the CLI), the file is turned into command-line arguments
//! and parsed by the same clap definition: every option, its default and its checks are the
//! CLI's. An option given on the command line (or through its environment variable) overrides
//! the file's; a key that names no option is an error naming the key, so that a typo is never
//! silently ignored.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::ArgAction;

/// Largest config file read (a real one is a few hundred bytes): a larger file is refused
/// rather than read into memory.
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024;

/// Why a config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file cannot be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_CONFIG_BYTES`].
    #[error("config file {path}: {size} bytes, at most {MAX_CONFIG_BYTES} are read")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The file is not TOML.
    #[error("config file {path}: not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What the parser said (with the line and column).
        message: String,
    },
    /// A key names no option of the command.
    #[error("config file {path}: unknown key `{key}`{hint}")]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// A suggestion, or empty.
        hint: String,
    },
    /// A key's value has a type no option takes (a table, an array, a date).
    #[error("config file {path}: key `{key}`: {message}")]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The arguments `args` (a whole command line, program name first) with the options of the
/// TOML file `path` appended for `subcommand`'s options not given on the command line or by
/// their environment variable. `command` is the program's clap definition, `given` what clap
/// parsed from `args` alone for `subcommand`. Parse the result again with the same definition:
/// the file's values then go through the CLI's own checks.
pub fn merge_args(
    command: &clap::Command,
    subcommand: &str,
    given: &clap::ArgMatches,
    args: &[OsString],
    path: &Path,
) -> Result<Vec<OsString>, ConfigFileError> {
    let text = read_bounded(path)?;
    let table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| ConfigFileError::Syntax {
                path: path.to_owned(),
                message: e.to_string().trim_end().to_owned(),
            })?;
    let mut command = command.clone();
    command.build();
    let options: Vec<clap::Arg> = command
        .find_subcommand(subcommand)
        .map(|sub| sub.get_arguments().cloned().collect())
        .unwrap_or_default();
    let mut merged = args.to_vec();
    for (key, value) in &table {
        let option = options
            .iter()
            .filter(|arg| arg.get_id() != "config")
            .find(|arg| arg.get_long() == Some(key.as_str()));
        let Some(option) = option else {
            let dashed = key.replace('_', "-");
            let hint = if options
                .iter()
                .any(|a| a.get_long() == Some(dashed.as_str()))
            {
                format!(" (did you mean `{dashed}`?)")
            } else {
                " (keys are `serve`'s option names without `--`: see `rendezvous serve --help`)"
                    .to_owned()
            };
            return Err(ConfigFileError::UnknownKey {
                path: path.to_owned(),
                key: key.clone(),
                hint,
            });
        };
        let id = option.get_id().as_str();
        let from_user = matches!(
            given.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if from_user {
            continue;
        }
        let bad = |message: &str| ConfigFileError::BadValue {
            path: path.to_owned(),
            key: key.clone(),
            message: message.to_owned(),
        };
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Float(x) => x.to_string(),
            toml::Value::Boolean(b) => {
                if matches!(option.get_action(), ArgAction::SetTrue) {
                    if *b {
                        merged.push(format!("--{key}").into());
                    }
                    continue;
                }
                b.to_string()
            }
            toml::Value::Datetime(_) => return Err(bad("a date is not an option value")),
            toml::Value::Array(_) => return Err(bad("a list is not an option value")),
            toml::Value::Table(_) => {
                return Err(bad("a table is not an option value (keys are top-level)"))
            }
        };
        // `--key=value`: a value starting with `-` is not taken for an option.
        merged.push(format!("--{key}={text}").into());
    }
    Ok(merged)
}

fn read_bounded(path: &Path) -> Result<String, ConfigFileError> {
    use std::io::Read;
    let read_err = |source| ConfigFileError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        let size = std::fs::metadata(path).map_or(bytes.len() as u64, |m| m.len());
        return Err(ConfigFileError::TooLarge {
            path: path.to_owned(),
            size,
        });
    }
    String::from_utf8(bytes).map_err(|_| ConfigFileError::Syntax {
        path: path.to_owned(),
        message: "not UTF-8".to_owned(),
    })
}
