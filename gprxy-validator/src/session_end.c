/*
 * Ending a session when its token does (gprxy.session_policy, PostgreSQL 18).
 *
 * The validator plans the end at login (gprxy_session_plan); once the login has succeeded
 * (ClientAuthentication_hook) two things watch it:
 *
 *  - A POSIX timer of the backend's own, on a real-time signal PostgreSQL does not use, so that
 *    nothing in PostgreSQL cancels it (its timeout.c timers are all cancelled after every
 *    error). When it fires, the handler sends the backend SIGTERM, PostgreSQL's own termination
 *    path (as statement_timeout does during authentication): strict at the end; idle, every
 *    IDLE_POLL_MS after the end, once the backend waits for the client's next command with no
 *    transaction open, or at the hard limit whatever it is doing. The handler only reads memory
 *    and calls kill(), which is async-signal-safe.
 *  - The start of every statement (ExecutorStart and ProcessUtility hooks): strict past the
 *    end, idle past the hard limit or in a transaction that began after the end (a client that
 *    always has the next command queued is never idle), the statement fails with FATAL.
 *  - The start of every function call a fast-path request (FunctionCall) makes, which reaches
 *    neither hook above (object_access_hook, OAT_FUNCTION_EXECUTE), by the same rule.
 *  - The commit of every transaction (XACT_EVENT_PRE_COMMIT and PRE_PREPARE), by the same
 *    rule: a transaction that began after the end never commits, whichever way its work came
 *    (a procedure commits inside one statement). Its work is rolled back and the backend ends
 *    with FATAL.
 *
 * Without a POSIX timer (timer_create fails when RLIMIT_SIGPENDING, counted per OS user, is used
 * up; some sandboxes set it to 0) the login is not refused: the same work runs on PostgreSQL's
 * own timer (timeout.c, SIGALRM, which needs no queued signal), armed again after every error
 * from the transaction callback, the log hook and every statement, call and commit. The
 * postmaster says so once at start.
 *
 * The client reads gprxy's message with SQLSTATE 28000: raised here at a statement's start, or
 * replacing PostgreSQL's "terminating connection due to administrator command" for the SIGTERM
 * the timer sent (emit_log_hook). The server log gets an audit line as the backend exits.
 *
 * Fallback mode (PostgreSQL 13 to 17, and 18 behind gprxy's fallback mode): the proxy's signed
 * context carries the session's end (gprxy.set_context calls gprxy_session_bind, reset_context
 * gprxy_session_unbind), and the same statement, function-call and commit checks run for that
 * pooled session, without the timer (the proxy times the end), for work done after the end by
 * a statement that began before it: a procedure or DO block that commits in a loop is ended at
 * its first statement or commit past the end. Statements that reach the server after the end
 * are the proxy's to let in (its own reset, a request inside a transaction begun before).
 *
 * C, not Rust: the timer's handler runs inside a signal handler, the FATALs longjmp, and the
 * message is rewritten inside PostgreSQL's error reporting, where no Rust frame may be.
 */
#include "postgres.h"

#include <signal.h>
#include <time.h>

#include "access/xact.h"
#include "catalog/objectaccess.h"
#include "executor/executor.h"
#include "libpq/auth.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "tcop/utility.h"
#include "utils/elog.h"
#include "utils/memutils.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

/* How often an idle-mode session past its end looks whether it is idle. */
#define IDLE_POLL_MS 100
/* The real-time signal of the session timer (PostgreSQL uses none of them). */
#define SESSION_SIGNAL (SIGRTMIN + 5)

static struct
{
	bool		planned;		/* the validator planned an end for this login */
	bool		armed;			/* the login succeeded; the checks run */
	bool		timed;			/* the POSIX timer runs */
	bool		pg_timer;		/* PostgreSQL's timer (timeout.c) is used instead */
	bool		bound;			/* fallback: the end came with the proxy's signed context */
	bool		strict;
	time_t		end_unix;
	TimestampTz end_at;
	TimestampTz hard_at;
	TimestampTz login_at;
	char	   *message;		/* what the client reads (TopMemoryContext) */
	char	   *audit;			/* the audit line, less the session's age */
#if PG_VERSION_NUM >= 180000
	timer_t		timer;
#endif
}			session;

static bool xact_callback_registered = false;

/* 1: the timer sent SIGTERM (the FATAL is to be explained); 2: the end was told. */
static volatile sig_atomic_t ending = 0;

static ExecutorStart_hook_type prev_executor_start_hook = NULL;
static ProcessUtility_hook_type prev_process_utility_hook = NULL;
static object_access_hook_type prev_object_access_hook = NULL;

#if PG_VERSION_NUM >= 180000

/* Waiting for the client's next message with no transaction open: the session is idle. */
static bool
backend_idle(void)
{
	return *my_wait_event_info == WAIT_EVENT_CLIENT_READ && !IsTransactionOrTransactionBlock();
}

/* The timer's work, in a signal handler: only reads memory and calls kill(). */
static void
session_due(void)
{
	if (!session.armed || ending)
		return;
	if (session.strict || backend_idle() || GetCurrentTimestamp() >= session.hard_at)
	{
		ending = 1;
		kill(MyProcPid, SIGTERM);
	}
}

/* The POSIX timer's signal handler. */
static void
session_timer_fired(SIGNAL_ARGS)
{
	(void) postgres_signal_arg;
	session_due();
}

static TimeoutId session_timeout = MAX_TIMEOUTS;

/*
 * PostgreSQL's timer, when no POSIX timer could be had: PostgreSQL cancels it after every error
 * (disable_all_timeouts), so it is armed again from the transaction callback (an error aborts
 * the transaction), the log hook (every ERROR reported), and every statement, function call and
 * commit. Cheap when it is running: one array read.
 */
static void
pg_timer_rearm(void)
{
	if (!session.pg_timer || !session.armed || ending || get_timeout_active(session_timeout))
		return;
	enable_timeout_every(session_timeout, session.end_at, session.strict ? 0 : IDLE_POLL_MS);
}

#else

static void
pg_timer_rearm(void)
{
}

#endif

/* FATAL at a statement's start or a commit once the session's end has come (see the top
 * comment). */
/*
 * When the current transaction began by the clock: the first statement, call or commit this file
 * saw in it. PostgreSQL's own transaction start is the message's arrival, the same for every
 * transaction one multi-statement Query opens ("...; COMMIT; BEGIN; INSERT ...; COMMIT" sent before
 * the end would otherwise commit a transaction begun after it).
 */
static LocalTransactionId seen_lxid = InvalidLocalTransactionId;
static TimestampTz seen_at = 0;

static TimestampTz
transaction_seen_at(TimestampTz now)
{
#if PG_VERSION_NUM >= 170000
	LocalTransactionId lxid = MyProc->vxid.lxid;
#else
	LocalTransactionId lxid = MyProc->lxid;
#endif

	if (lxid != seen_lxid)
	{
		seen_lxid = lxid;
		seen_at = now;
	}
	return seen_at;
}

static void
check_session_end(void)
{
	TimestampTz now;
	TimestampTz began;

	if (!session.armed || ending)
		return;
	pg_timer_rearm();
	now = GetCurrentTimestamp();
	began = transaction_seen_at(now);
	if (now < session.end_at)
		return;
	/*
	 * Fallback: the proxy decides which statements reach the server after the end (its own
	 * reset, a request inside a transaction begun before the end); what it cannot see is work
	 * that a statement it let in before the end goes on to do after it.
	 */
	if (session.bound && GetCurrentStatementStartTimestamp() >= session.end_at)
		return;
	if (session.strict || now >= session.hard_at ||
		GetCurrentTransactionStartTimestamp() >= session.end_at || began >= session.end_at)
	{
		ending = 2;
		ereport(FATAL,
				(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg_internal("%s", session.message)));
	}
}

static void
executor_start(QueryDesc *queryDesc, int eflags)
{
	check_session_end();
	if (prev_executor_start_hook)
		prev_executor_start_hook(queryDesc, eflags);
	else
		standard_ExecutorStart(queryDesc, eflags);
}

static void
process_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
				ProcessUtilityContext context, ParamListInfo params, QueryEnvironment *queryEnv,
				DestReceiver *dest, QueryCompletion *qc)
{
	check_session_end();
	if (prev_process_utility_hook)
		prev_process_utility_hook(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
}

/* A function about to run (fast-path calls, and functions in a statement's expressions). */
static void
object_access(ObjectAccessType access, Oid classId, Oid objectId, int subId, void *arg)
{
	if (access == OAT_FUNCTION_EXECUTE)
		check_session_end();
	if (prev_object_access_hook)
		prev_object_access_hook(access, classId, objectId, subId, arg);
}

/* A transaction that began after the end does not commit. */
static void
xact_callback(XactEvent event, void *arg)
{
	(void) arg;
	pg_timer_rearm();
	if (event == XACT_EVENT_PRE_COMMIT || event == XACT_EVENT_PARALLEL_PRE_COMMIT ||
		event == XACT_EVENT_PRE_PREPARE)
		check_session_end();
}

#if PG_VERSION_NUM >= 180000

static ClientAuthentication_hook_type prev_client_authentication_hook = NULL;
static emit_log_hook_type prev_emit_log_hook = NULL;

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
	struct sigevent sev;
	struct itimerspec when;

	if (prev_client_authentication_hook)
		prev_client_authentication_hook(port, status);
	if (status != STATUS_OK || !session.planned || session.armed)
		return;
	session.login_at = GetCurrentTimestamp();
	pqsignal(SESSION_SIGNAL, session_timer_fired);
	MemSet(&sev, 0, sizeof(sev));
	sev.sigev_notify = SIGEV_SIGNAL;
	sev.sigev_signo = SESSION_SIGNAL;
	before_shmem_exit(log_session_end, (Datum) 0);
	if (!xact_callback_registered)
	{
		RegisterXactCallback(xact_callback, NULL);
		xact_callback_registered = true;
	}
	session.armed = true;
	if (timer_create(CLOCK_REALTIME, &sev, &session.timer) == 0)
	{
		MemSet(&when, 0, sizeof(when));
		/* An end already due fires at once. */
		when.it_value.tv_sec = session.end_unix > 0 ? session.end_unix : 1;
		if (!session.strict)
			when.it_interval.tv_nsec = IDLE_POLL_MS * 1000000L;
		if (timer_settime(session.timer, TIMER_ABSTIME, &when, NULL) == 0)
		{
			session.timed = true;
			return;
		}
		timer_delete(session.timer);
	}
	/* No POSIX timer (RLIMIT_SIGPENDING used up): PostgreSQL's own, kept armed. */
	ereport(DEBUG1,
			(errmsg_internal("gprxy: no POSIX timer for this session's end (%m); PostgreSQL's timer is used")));
	if (session_timeout == MAX_TIMEOUTS)
		session_timeout = RegisterTimeout(USER_TIMEOUT, session_due);
	session.pg_timer = true;
	pg_timer_rearm();
}

/*
 * At preload, in the postmaster: whether backends will get POSIX timers, said once in the log
 * (a backend that cannot have one uses PostgreSQL's timer and says so only at DEBUG1).
 */
void
gprxy_session_timer_probe(void)
{
	struct sigevent sev;
	timer_t		probe;

	MemSet(&sev, 0, sizeof(sev));
	sev.sigev_notify = SIGEV_SIGNAL;
	sev.sigev_signo = SESSION_SIGNAL;
	if (timer_create(CLOCK_REALTIME, &sev, &probe) == 0)
	{
		timer_delete(probe);
		return;
	}
	ereport(LOG,
			(errmsg("gprxy: no POSIX timer for session ends (%m): sessions use PostgreSQL's timer, armed again after every error"),
			 errhint("timer_create counts against RLIMIT_SIGPENDING (ulimit -i) of the server's OS user.")));
}

/* Replaces PostgreSQL's message for the SIGTERM the timer sent with gprxy's own. */
static void
explain_termination(ErrorData *edata)
{
	/* PostgreSQL cancelled its timers before reporting this error. */
	if (edata->elevel >= ERROR)
		pg_timer_rearm();
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

#endif

/* _PG_init: installs the hooks (they do nothing for a session without a planned end). */
void
gprxy_session_hooks_install(void)
{
#if PG_VERSION_NUM >= 180000
	prev_client_authentication_hook = ClientAuthentication_hook;
	ClientAuthentication_hook = client_authenticated;
	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = explain_termination;
#endif
	prev_executor_start_hook = ExecutorStart_hook;
	ExecutorStart_hook = executor_start;
	prev_process_utility_hook = ProcessUtility_hook;
	ProcessUtility_hook = process_utility;
	prev_object_access_hook = object_access_hook;
	object_access_hook = object_access;
}

#if PG_VERSION_NUM >= 180000

/*
 * The validator accepted the token: the session ends at end_at (unix seconds), at once
 * (strict) or at its next idle point before hard_at. The strings are copied.
 */
void
gprxy_session_plan(int strict, int64 end_at, int64 hard_at, const char *message, const char *audit)
{
	session.strict = strict != 0;
	session.end_unix = (time_t) end_at;
	session.end_at = time_t_to_timestamptz((pg_time_t) end_at);
	session.hard_at = time_t_to_timestamptz((pg_time_t) hard_at);
	session.message = MemoryContextStrdup(TopMemoryContext, message);
	session.audit = MemoryContextStrdup(TopMemoryContext, audit);
	session.planned = true;
}

#endif

/*
 * Fallback mode: the proxy's signed context says when this pooled session ends (unix seconds,
 * strict or at the next idle point before hard_at); the statement, function-call and commit
 * checks run for it until gprxy_session_unbind. The message is copied.
 */
void
gprxy_session_bind(int strict, int64 end_at, int64 hard_at, const char *message)
{
	char	   *copy;

	if (session.planned)
		return;					/* a token login's own end (PostgreSQL 18) stays */
	/* Copied before the old one is freed: an ERROR here leaves nothing dangling. */
	copy = MemoryContextStrdup(TopMemoryContext, message);
	session.strict = strict != 0;
	session.end_at = time_t_to_timestamptz((pg_time_t) end_at);
	session.hard_at = time_t_to_timestamptz((pg_time_t) hard_at);
	if (session.message)
		pfree(session.message);
	session.message = copy;
	if (!xact_callback_registered)
	{
		RegisterXactCallback(xact_callback, NULL);
		xact_callback_registered = true;
	}
	session.bound = true;
	session.armed = true;
}

/* The pooled session ended (gprxy.reset_context): nothing is checked until the next bind. */
void
gprxy_session_unbind(void)
{
	if (session.planned)
		return;
	session.armed = false;
	session.bound = false;
}
