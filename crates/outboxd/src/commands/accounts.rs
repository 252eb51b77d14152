//! `outboxd user …` and `outboxd api-key …`: the same actions as the admin
//! API's `/api/users` and `/api/api-keys` and the dashboard's accounts page.

use std::io::Read;

use anyhow::Context;
use clap::Subcommand;
use outbox_admin::accounts;
use outbox_core::store::{apps, principals};

use outboxd::config::Settings;

use super::topics::{cli_actor, cli_error};

/// `outboxd user …`.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user; the password is generated and printed, or read from standard input with --password-stdin.
    Create {
        /// E-mail (the login name).
        email: String,
        /// Make the user an instance admin (every capability on every app).
        #[arg(long)]
        admin: bool,
        /// Read the password from standard input instead of generating one.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users with their roles, live sessions and API keys.
    List {
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Give a user a role on an app: viewer, operator or admin.
    Grant {
        /// E-mail of the user.
        email: String,
        /// App slug.
        app: String,
        /// viewer, operator or admin.
        role: String,
    },
    /// Take a user's role on an app away (effective on their next request).
    Revoke {
        /// E-mail of the user.
        email: String,
        /// App slug.
        app: String,
    },
    /// Make a user an instance admin: every capability on every app (effective on their next request).
    Promote {
        /// E-mail of the user.
        email: String,
    },
    /// Take a user's instance-admin rights away (not the last instance admin's); their app roles stay.
    Demote {
        /// E-mail of the user.
        email: String,
    },
    /// Set a user's password (generated and printed, or read from standard
    /// input with --password-stdin); every session of the user ends.
    Passwd {
        /// E-mail of the user.
        email: String,
        /// Read the password from standard input instead of generating one.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Delete a user with their roles, sessions and API keys (not the last instance admin).
    Delete {
        /// E-mail of the user.
        email: String,
    },
    /// Clear a user's login throttle (after failed logins).
    Unlock {
        /// E-mail of the user.
        email: String,
    },
    /// Sign a user out everywhere: every dashboard session and API token ends.
    RevokeSessions {
        /// E-mail of the user.
        email: String,
    },
}

/// `outboxd api-key …`.
#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create an API key acting as a user; the key is printed once.
    Create {
        /// E-mail of the user the key acts as.
        email: String,
        /// A name to tell keys apart.
        #[arg(long, default_value = "cli")]
        name: String,
    },
    /// List API keys: prefix, name, owner, created and last used.
    List {
        /// Only this user's keys.
        #[arg(long)]
        owner: Option<String>,
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an API key by its prefix (the 8 characters after `obx_`).
    Revoke {
        /// The key's prefix (or the whole key).
        prefix: String,
    },
}

/// A readable random password: 20 characters from a 56-letter alphabet.
fn generate_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let (_, prefix, hash) = outbox_admin::auth::new_api_key();
    // new_api_key draws from the OS generator; reuse its randomness.
    (prefix + &hash)
        .bytes()
        .step_by(2)
        .take(20)
        .zip(hash.bytes().skip(1))
        .map(|(a, b)| ALPHABET[(usize::from(a) * 31 + usize::from(b)) % ALPHABET.len()] as char)
        .collect()
}

/// The password from standard input, or a generated one (and whether it was).
fn password(from_stdin: bool) -> anyhow::Result<(String, bool)> {
    if from_stdin {
        let mut buf = String::new();
        std::io::stdin()
            .read_to_string(&mut buf)
            .context("reading the password from standard input")?;
        let line = buf.lines().next().unwrap_or_default().to_owned();
        Ok((line, false))
    } else {
        Ok((generate_password(), true))
    }
}

/// Names the e-mail when the user does not exist.
fn named(email: &str) -> impl FnOnce(outbox_admin::ApiError) -> anyhow::Error + '_ {
    move |err| match err {
        outbox_admin::ApiError::NotFound("user") => anyhow::anyhow!("no user {email:?}"),
        other => other.into(),
    }
}

/// Runs `outboxd user promote` (`admin`) or `demote`.
async fn set_instance_admin(pool: &sqlx::PgPool, email: &str, admin: bool) -> anyhow::Result<()> {
    let (user, changed) = accounts::set_instance_admin(pool, &cli_actor(), email, admin)
        .await
        .map_err(named(email))?;
    let said = match (admin, changed) {
        (true, true) => "is an instance admin",
        (true, false) => "was already an instance admin",
        (false, true) => "is no longer an instance admin",
        (false, false) => "was not an instance admin",
    };
    println!("{} {said}", user.email);
    Ok(())
}

/// Runs `outboxd user …`.
pub async fn user(settings: Settings, cmd: UserCommand) -> anyhow::Result<()> {
    let pool = outboxd::db::connect(&settings, 0).await?;
    match cmd {
        UserCommand::Create {
            email,
            admin,
            password_stdin,
        } => {
            let (password, generated) = password(password_stdin)?;
            let hasher = outbox_admin::auth::Hasher::new()?;
            let user =
                accounts::create_user(&pool, &hasher, &cli_actor(), &email, &password, admin)
                    .await?;
            println!(
                "created user {} ({})",
                user.email,
                if user.is_admin {
                    "instance admin"
                } else {
                    "no roles yet"
                }
            );
            if generated {
                println!("password: {password}");
            }
        }
        UserCommand::List { json } => {
            let users = accounts::list_users(&pool).await?;
            if json {
                println!("{}", serde_json::json!({ "items": users }));
                return Ok(());
            }
            println!(
                "{:<32}  {:<5}  {:>8}  {:>8}  {:<20}  ROLES",
                "EMAIL", "ADMIN", "SESSIONS", "API KEYS", "CREATED"
            );
            for u in &users {
                println!(
                    "{:<32}  {:<5}  {:>8}  {:>8}  {:<20}  {}",
                    u.email,
                    if u.is_admin { "yes" } else { "no" },
                    u.sessions,
                    u.api_keys,
                    super::when(u.created_at),
                    if u.roles.is_empty() {
                        "-".to_owned()
                    } else {
                        u.roles.join(", ")
                    }
                );
            }
            println!("{} user(s)", users.len());
        }
        UserCommand::Grant { email, app, role } => {
            let role: principals::Role = role.parse()?;
            let app = apps::by_slug(&pool, &app).await?;
            let user = accounts::find_user(&pool, &email)
                .await
                .map_err(named(&email))?;
            let changed = accounts::grant_role(&pool, &cli_actor(), app.id, &user, role)
                .await
                .map_err(cli_error)?;
            println!(
                "{} is {} of {}{}",
                user.email,
                role.as_str(),
                app.slug,
                if changed {
                    ""
                } else {
                    " already; nothing changed"
                }
            );
        }
        UserCommand::Revoke { email, app } => {
            let app = apps::by_slug(&pool, &app).await?;
            let user = accounts::find_user(&pool, &email)
                .await
                .map_err(named(&email))?;
            let revoked = accounts::revoke_role(&pool, &cli_actor(), app.id, &user)
                .await
                .map_err(cli_error)?;
            if revoked {
                println!("{} has no role on {} any more", user.email, app.slug);
            } else {
                println!("{} had no role on {}", user.email, app.slug);
            }
        }
        UserCommand::Promote { email } => set_instance_admin(&pool, &email, true).await?,
        UserCommand::Demote { email } => set_instance_admin(&pool, &email, false).await?,
        UserCommand::Passwd {
            email,
            password_stdin,
        } => {
            let (password, generated) = password(password_stdin)?;
            let hasher = outbox_admin::auth::Hasher::new()?;
            let ended = accounts::set_password(&pool, &hasher, &email, &password)
                .await
                .map_err(named(&email))?;
            println!("password of {email} changed; {ended} session(s) ended");
            if generated {
                println!("password: {password}");
            }
        }
        UserCommand::Delete { email } => {
            let user = accounts::delete_user(&pool, &cli_actor(), &email)
                .await
                .map_err(named(&email))?;
            println!(
                "deleted {} with their roles, sessions and API keys",
                user.email
            );
        }
        UserCommand::Unlock { email } => {
            let cleared = accounts::unlock(&pool, &email)
                .await
                .map_err(named(&email))?;
            println!("{email}: login throttle cleared ({cleared} count(s))");
        }
        UserCommand::RevokeSessions { email } => {
            let ended = accounts::revoke_sessions(&pool, &email)
                .await
                .map_err(named(&email))?;
            println!("{email}: {ended} session(s) ended");
        }
    }
    Ok(())
}

/// Runs `outboxd api-key …`.
pub async fn api_key(settings: Settings, cmd: ApiKeyCommand) -> anyhow::Result<()> {
    let pool = outboxd::db::connect(&settings, 0).await?;
    match cmd {
        ApiKeyCommand::Create { email, name } => {
            let user = accounts::find_user(&pool, &email)
                .await
                .map_err(named(&email))?;
            let key = outbox_admin::create_api_key(&pool, user.id, &name).await?;
            println!("{key}");
            eprintln!("(shown once: store it now)");
        }
        ApiKeyCommand::List { owner, json } => {
            let keys = accounts::list_api_keys(&pool, owner.as_deref()).await?;
            if json {
                println!("{}", serde_json::json!({ "items": keys }));
                return Ok(());
            }
            println!(
                "{:<10}  {:<16}  {:<28}  {:<20}  {:<20}  STATE",
                "PREFIX", "NAME", "OWNER", "CREATED", "LAST USED"
            );
            for k in &keys {
                println!(
                    "{:<10}  {:<16}  {:<28}  {:<20}  {:<20}  {}",
                    k.prefix,
                    super::ellipsize(&k.name, 16),
                    k.owner,
                    super::when(k.created_at),
                    k.last_used_at
                        .map_or_else(|| "never".to_owned(), super::when),
                    if k.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    }
                );
            }
            println!("{} key(s)", keys.len());
        }
        ApiKeyCommand::Revoke { prefix } => {
            let revoked =
                accounts::revoke_api_key(&pool, &prefix)
                    .await
                    .map_err(|err| match err {
                        outbox_admin::ApiError::NotFound(_) => {
                            anyhow::anyhow!("no API key with the prefix {prefix:?}")
                        }
                        other => other.into(),
                    })?;
            if revoked.already {
                println!("obx_{}_… was already revoked", revoked.prefix);
            } else {
                println!("revoked obx_{}_…", revoked.prefix);
            }
        }
    }
    Ok(())
}
