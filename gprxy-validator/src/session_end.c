/*
 * Ending a session when its token does (gprxy.session_policy, PostgreSQL 18).
 *
 * The validator plans the end at login (gprxy_session_plan); once the login has succeeded
 * (ClientAuthentication_hook) a timer runs. When it fires:
 *   strict: the backend sends itself SIGTERM, PostgreSQL's own termination path (as its
 *           statement_timeout does during authentication): an open transaction rolls back;
 *   idle:   every IDLE_POLL_MS it looks whether the backend waits for the client's next
 *           command outside a transaction, and only then ends it the same way (or at the hard
 *           limit whatever it is doing).
 * The client then reads PostgreSQL's FATAL with gprxy's message and SQLSTATE 28000 instead of
 * "terminating connection due to administrator command" (emit_log_hook), and the server log
 * gets an audit line as the backend exits.
 *
 * C, not Rust: the timer's handler runs inside a signal handler (it only reads memory and
 * calls kill(), which is async-signal-safe), and the message is rewritten inside PostgreSQL's
 * error reporting, where no Rust frame may be.
 */
#include "postgres.h"

#include <signal.h>

#include "access/xact.h"
#include "libpq/auth.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "utils/elog.h"
#include "utils/memutils.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#if PG_VERSION_NUM >= 180000

/* How often an idle-mode session past its end looks whether it is idle. */
#define IDLE_POLL_MS 100

static struct
{
	bool		planned;		/* the validator planned an end for this login */
	bool		armed;			/* the login succeeded; the timer runs */
	bool		strict;
	TimestampTz end_at;
	TimestampTz hard_at;
	TimestampTz login_at;
	char	   *message;		/* what the client reads (TopMemoryContext) */
	char	   *audit;			/* the audit line, less the session's age */
	TimeoutId	timer;
}			session;

/* Set by the timer just before the backend signals itself; read by the two hooks below. */
static volatile sig_atomic_t ending = 0;

static ClientAuthentication_hook_type prev_client_authentication_hook = NULL;
static emit_log_hook_type prev_emit_log_hook = NULL;

/* Waiting for the client's next message with no transaction open: the session is idle. */
static bool
backend_idle(void)
{
	return *my_wait_event_info == WAIT_EVENT_CLIENT_READ && !IsTransactionOrTransactionBlock();
}

/* The timer's handler: runs in the SIGALRM handler, so it only reads memory and calls kill(). */
static void
session_timer_fired(void)
{
	int			save_errno = errno;

	if (!ending &&
		(session.strict || backend_idle() || GetCurrentTimestamp() >= session.hard_at))
	{
		ending = 1;
		kill(MyProcPid, SIGTERM);
	}
	errno = save_errno;
}

static void
arm_timer(void)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz first = Max(session.end_at, now);

	if (session.strict)
		enable_timeout_at(session.timer, first);
	else
		enable_timeout_every(session.timer, first, IDLE_POLL_MS);
}

/*
 * After an error PostgreSQL cancels every timer (disable_all_timeouts), as does a hot
 * standby's conflict handling: the end of each transaction, and the abort of each
 * subtransaction (an error inside a savepoint leaves the transaction open), put the session's
 * timer back.
 */
static void
rearm_timer(void)
{
	if (session.armed && !ending && !get_timeout_active(session.timer))
		arm_timer();
}

static void
transaction_ended(XactEvent event, void *arg)
{
	(void) arg;
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT || event == XACT_EVENT_PREPARE)
		rearm_timer();
}

static void
subtransaction_ended(SubXactEvent event, SubTransactionId sub, SubTransactionId parent, void *arg)
{
	(void) sub;
	(void) parent;
	(void) arg;
	if (event == SUBXACT_EVENT_ABORT_SUB)
		rearm_timer();
}

/* The audit line, as the backend exits (PostgreSQL's log_disconnections logs the same way). */
static void
log_session_end(int code, Datum arg)
{
	long		secs;
	int			usecs;

	(void) code;
	(void) arg;
	if (!ending || !session.audit)
		return;
	TimestampDifference(session.login_at, GetCurrentTimestamp(), &secs, &usecs);
	ereport(LOG, (errmsg_internal("%s age_s=%ld.%03d", session.audit, secs, usecs / 1000)));
}

static void
client_authenticated(Port *port, int status)
{
	if (prev_client_authentication_hook)
		prev_client_authentication_hook(port, status);
	if (status != STATUS_OK || !session.planned || session.armed)
		return;
	session.login_at = GetCurrentTimestamp();
	session.timer = RegisterTimeout(USER_TIMEOUT, session_timer_fired);
	RegisterXactCallback(transaction_ended, NULL);
	RegisterSubXactCallback(subtransaction_ended, NULL);
	before_shmem_exit(log_session_end, (Datum) 0);
	session.armed = true;
	arm_timer();
}

/* Replaces PostgreSQL's message for the SIGTERM the timer sent with gprxy's own. */
static void
explain_termination(ErrorData *edata)
{
	if (ending == 1 && edata->elevel == FATAL && edata->sqlerrcode == ERRCODE_ADMIN_SHUTDOWN &&
		session.message)
	{
		edata->sqlerrcode = ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION;
		edata->message = MemoryContextStrdup(ErrorContext, session.message);
		edata->message_id = edata->message;
		ending = 2;
	}
	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

/* _PG_init: installs the two hooks (they do nothing for a session without a planned end). */
void
gprxy_session_hooks_install(void)
{
	prev_client_authentication_hook = ClientAuthentication_hook;
	ClientAuthentication_hook = client_authenticated;
	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = explain_termination;
}

/*
 * The validator accepted the token: the session ends at end_at (unix seconds), at once
 * (strict) or at its next idle point before hard_at. The strings are copied.
 */
void
gprxy_session_plan(int strict, int64 end_at, int64 hard_at, const char *message, const char *audit)
{
	session.strict = strict != 0;
	session.end_at = time_t_to_timestamptz((pg_time_t) end_at);
	session.hard_at = time_t_to_timestamptz((pg_time_t) hard_at);
	session.message = MemoryContextStrdup(TopMemoryContext, message);
	session.audit = MemoryContextStrdup(TopMemoryContext, audit);
	session.planned = true;
}

#endif
