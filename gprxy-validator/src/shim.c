/*
 * What gprxy_validator needs from MyProcPort, which pgrx declares opaque: startup parameters
 * and (PostgreSQL 18) the matched pg_hba line's OAuth options and the client's address. Each returns NULL when there is no port or
 * no hba line (never during a normal OAuth login).
 */
#include "postgres.h"

#include <stddef.h>
#include <stdint.h>

/*
 * The pgrx feature (pg15 ... pg19) and pg_config's headers must be of one major: the Rust side
 * reads what this file returns through pgrx's bindings of that major. build.rs passes the
 * feature's major.
 */
#if defined(GPRXY_PG_MAJOR) && PG_VERSION_NUM / 10000 != GPRXY_PG_MAJOR
#error "pg_config's headers are not of the PostgreSQL major the pgrx feature names"
#endif

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
#include "libpq/oauth.h"

/*
 * libpq/oauth.h's layout as this server's header declares it: the magic, each struct's size and
 * its fields' offsets, then PG_VERSION_NUM. The Rust declarations (src/ffi/validator.rs) are
 * compared with it when the library loads, and a difference refuses the load. SIZE_MAX: a field
 * this major does not have. Returns how many values there are; writes at most n.
 */
int
gprxy_oauth_abi(size_t *out, int n)
{
	const size_t abi[] = {
		PG_OAUTH_VALIDATOR_MAGIC,
		sizeof(ValidatorModuleState),
		offsetof(ValidatorModuleState, sversion),
		offsetof(ValidatorModuleState, private_data),
		sizeof(ValidatorModuleResult),
		offsetof(ValidatorModuleResult, authorized),
		offsetof(ValidatorModuleResult, authn_id),
#if PG_VERSION_NUM >= 190000
		offsetof(ValidatorModuleResult, error_detail),
#else
		SIZE_MAX,
#endif
		sizeof(OAuthValidatorCallbacks),
		offsetof(OAuthValidatorCallbacks, magic),
		offsetof(OAuthValidatorCallbacks, startup_cb),
		offsetof(OAuthValidatorCallbacks, shutdown_cb),
		offsetof(OAuthValidatorCallbacks, validate_cb),
		PG_VERSION_NUM,
	};
	int			count = (int) lengthof(abi);

	for (int i = 0; i < count && i < n; i++)
		out[i] = abi[i];
	return count;
}

#if PG_VERSION_NUM >= 190000
/*
 * PostgreSQL 19: the pg_hba options the validator reads (validator.NAME=value on the line).
 * Only from the startup callback.
 */
void
gprxy_register_hba_options(ValidatorModuleState *state)
{
	static const char *options[] = {"entry"};

	RegisterOAuthHBAOptions(state, lengthof(options), options);
}

/* The matched pg_hba line's validator.NAME, or NULL (only during validation). */
const char *
gprxy_hba_option(const ValidatorModuleState *state, const char *name)
{
	return GetOAuthHBAOption(state, name);
}
#endif

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

#if PG_VERSION_NUM >= 180000
#include "lib/stringinfo.h"
#include "utils/acl.h"
#include "utils/guc.h"
#include "utils/memutils.h"

/*
 * Whether an hba line's user column can match role: `all`, the name itself, a `+group` the role
 * is a member of (as hba.c decides, SET-able membership), and any regular expression, which is
 * counted as a match without being evaluated (the answer may say "can" where it cannot, never
 * the other way).
 */
static bool
gprxy_roles_can_match(List *tokens, const char *role, Oid roleid)
{
	ListCell   *cell;

	foreach(cell, tokens)
	{
		AuthToken  *tok = lfirst(cell);

		if (tok->regex != NULL)
			return true;
		if (!tok->quoted && tok->string[0] == '+')
		{
			Oid			group = get_role_oid(tok->string + 1, true);

			if (OidIsValid(roleid) && OidIsValid(group) && is_member_of_role_nosuper(roleid, group))
				return true;
		}
		else if ((!tok->quoted && strcmp(tok->string, "all") == 0) || strcmp(tok->string, role) == 0)
			return true;
	}
	return false;
}

/*
 * The issuers of every oauth line of pg_hba.conf (as the file reads now, its includes followed)
 * whose user column can match role, one per line in a string palloc'd in the caller's memory
 * context; NULL when the file cannot be opened or any line of it (includes too) does not
 * tokenize or parse. Parsing happens in a context of its own, deleted before returning.
 */
char *
gprxy_hba_oauth_issuers_for_role(const char *role)
{
	MemoryContext caller = CurrentMemoryContext;
	MemoryContext work = AllocSetContextCreate(caller, "gprxy pg_hba check", ALLOCSET_SMALL_SIZES);
	MemoryContext old = MemoryContextSwitchTo(work);
	Oid			roleid = get_role_oid(role, true);
	List	   *lines = NIL;
	ListCell   *cell;
	StringInfoData found;
	FILE	   *file;
	char	   *result;

	initStringInfo(&found);
	file = open_auth_file(HbaFileName, DEBUG3, 0, NULL);
	if (file == NULL)
	{
		MemoryContextSwitchTo(old);
		MemoryContextDelete(work);
		return NULL;
	}
	tokenize_auth_file(HbaFileName, file, &lines, DEBUG3, 0);
	foreach(cell, lines)
	{
		TokenizedAuthLine *tok = lfirst(cell);
		HbaLine    *hba;

		/*
		 * A line that does not tokenize or parse (an include that became unreadable, a typo):
		 * PostgreSQL keeps the lines in force from before, which may be anything, so the
		 * answer is "cannot tell" (the caller refuses).
		 */
		if (tok->err_msg != NULL || (hba = parse_hba_line(tok, DEBUG3)) == NULL)
		{
			free_auth_file(file, 0);
			MemoryContextSwitchTo(old);
			MemoryContextDelete(work);
			return NULL;
		}
		if (hba->auth_method != uaOAuth || hba->oauth_issuer == NULL)
			continue;
		if (gprxy_roles_can_match(hba->roles, role, roleid))
			appendStringInfo(&found, "%s\n", hba->oauth_issuer);
	}
	/* Deletes the tokenizer's own context too (depth 0). */
	free_auth_file(file, 0);
	result = MemoryContextStrdup(caller, found.data);
	MemoryContextSwitchTo(old);
	MemoryContextDelete(work);
	return result;
}
#endif
