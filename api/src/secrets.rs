//! Settings that hold secrets (webhook secrets, admin tokens): parsed for
//! clap without ever echoing the value, since clap's usual "invalid value
//! '...'" would print the secret.

use std::marker::PhantomData;

/// A setting whose value is secret.
pub trait Secret: Sized + Clone + Send + Sync + 'static {
    /// Its environment variable, for error messages.
    const NAME: &'static str;

    /// Parses the value; the error must not contain it.
    fn parse(text: &str) -> Result<Self, String>;
}

/// The clap value parser of a [`Secret`].
#[derive(Clone)]
pub struct SecretParser<T>(PhantomData<T>);

impl<T> SecretParser<T> {
    /// The parser.
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<T> Default for SecretParser<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Secret> clap::builder::TypedValueParser for SecretParser<T> {
    type Value = T;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        let text = value.to_str().ok_or_else(|| {
            clap::Error::raw(
                clap::error::ErrorKind::InvalidUtf8,
                format!("{} is not UTF-8\n", T::NAME),
            )
        })?;
        T::parse(text).map_err(|problem| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("{}: {problem} (the value is not shown)\n", T::NAME),
            )
        })
    }
}
