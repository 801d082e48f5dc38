//! Stable error codes. Each error enum's codes are a fieldless enum declared
//! with [`error_codes!`], which gives `ALL` (built from the same list as the
//! enum, so it cannot miss a code) and `as_str`. Each error's `kind()` maps its
//! variants to those codes by an exhaustive match, so a new variant does not
//! compile without one; a test compares the union of every `ALL` with the
//! book's error-code table (docs/src/error-codes.md) in both directions.

/// Declares a fieldless code enum: `enum Name { Variant = "area.code", … }`
/// becomes the enum, `Name::ALL` (every variant, in order), `Name::as_str` and
/// `Display`.
macro_rules! error_codes {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident = $code:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every code of this kind, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The stable code, as the error-code table lists it.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $code,)+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub(crate) use error_codes;

#[cfg(test)]
mod tests {
    error_codes! {
        /// Two codes.
        enum Sample {
            /// First.
            First = "sample.first",
            /// Second.
            Second = "sample.second",
        }
    }

    #[test]
    fn all_lists_every_variant_with_its_code() {
        let codes: Vec<&str> = Sample::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(codes, ["sample.first", "sample.second"]);
        assert_eq!(Sample::Second.to_string(), "sample.second");
    }
}
