//! A Redis server reached through any cloneable async redis-rs connection
//! (`MultiplexedConnection`, `ConnectionManager`, or the user's own).

use std::sync::Arc;

use redis::aio::ConnectionLike;
use redis::{ErrorKind, RedisError, Value};

use super::{BoxFuture, Instance, Reply};
use crate::scripts;

/// A Redis instance over connection `C`; every operation clones `C`, which for
/// multiplexed connections shares one socket.
pub(crate) struct RedisInstance<C> {
    connection: C,
}

impl<C> RedisInstance<C> {
    pub(crate) fn new(connection: C) -> Self {
        Self { connection }
    }
}

impl<C> Instance for RedisInstance<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn set_nx_px(&self, key: &Arc<str>, token: &Arc<str>, ttl_ms: u64) -> BoxFuture<Reply> {
        let mut connection = self.connection.clone();
        let mut set = redis::cmd("SET");
        set.arg(&**key)
            .arg(&**token)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms);
        Box::pin(async move {
            match set.query_async::<Value>(&mut connection).await? {
                Value::Okay => Ok(true),
                Value::SimpleString(ok) if ok == "OK" => Ok(true),
                Value::Nil => Ok(false),
                other => Err(unexpected("SET NX PX", &other)),
            }
        })
    }

    fn release(&self, key: &Arc<str>, token: &Arc<str>) -> BoxFuture<Reply> {
        let mut connection = self.connection.clone();
        let mut release = scripts::RELEASE.prepare_invoke();
        release.key(&**key).arg(&**token);
        Box::pin(async move {
            let deleted: i64 = release.invoke_async(&mut connection).await?;
            Ok(deleted == 1)
        })
    }

    fn load_scripts(&self) -> BoxFuture<Reply> {
        let mut connection = self.connection.clone();
        Box::pin(async move {
            for script in scripts::all() {
                script.prepare_invoke().load_async(&mut connection).await?;
            }
            Ok(true)
        })
    }
}

fn unexpected(command: &str, reply: &Value) -> RedisError {
    RedisError::from((
        ErrorKind::UnexpectedReturnType,
        "unexpected reply",
        format!("{command} answered {reply:?}"),
    ))
}
