/*
 * What gprxy_validator needs from MyProcPort, which pgrx declares opaque: startup parameters
 * and (PostgreSQL 18) the matched pg_hba line's OAuth options and the client's address. Each returns NULL when there is no port or
 * no hba line (never during a normal OAuth login).
 */
#include "postgres.h"
#include "libpq/hba.h"
#include "libpq/libpq-be.h"
#include "miscadmin.h"
#include "nodes/pg_list.h"

/*
 * The value of a startup-packet parameter (MyProcPort->guc_options holds name, value pairs as
 * the client sent them) and, in *count, how many times the packet named it.
 */
const char *
gprxy_startup_parameter(const char *name, int *count)
{
	const char *found = NULL;
	ListCell   *cell;

	*count = 0;
	if (!MyProcPort)
		return NULL;
	cell = list_head(MyProcPort->guc_options);
	while (cell)
	{
		const char *key = lfirst(cell);
		ListCell   *value = lnext(MyProcPort->guc_options, cell);

		if (!value)
			break;
		if (strcmp(key, name) == 0)
		{
			found = lfirst(value);
			(*count)++;
		}
		cell = lnext(MyProcPort->guc_options, value);
	}
	return found;
}

#if PG_VERSION_NUM >= 180000

const char *
gprxy_hba_oauth_issuer(void)
{
	return (MyProcPort && MyProcPort->hba) ? MyProcPort->hba->oauth_issuer : NULL;
}

const char *
gprxy_hba_oauth_scope(void)
{
	return (MyProcPort && MyProcPort->hba) ? MyProcPort->hba->oauth_scope : NULL;
}

int
gprxy_hba_oauth_skip_usermap(void)
{
	return (MyProcPort && MyProcPort->hba) ? (int) MyProcPort->hba->oauth_skip_usermap : 0;
}

const char *
gprxy_port_remote_host(void)
{
	return MyProcPort ? MyProcPort->remote_host : NULL;
}

const char *
gprxy_port_database(void)
{
	return MyProcPort ? MyProcPort->database_name : NULL;
}

/*
 * The validator's audit line: a success at LOG, a refusal only to the server log (as
 * PostgreSQL's validator documentation asks), with its SQLSTATE.
 */
void
gprxy_audit(int authorized, const char *line)
{
	if (authorized)
		ereport(LOG, (errmsg_internal("%s", line)));
	else
		ereport(LOG_SERVER_ONLY,
				(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg_internal("%s", line)));
}
#endif
