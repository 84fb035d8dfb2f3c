/*
 * What gprxy_validator needs from MyProcPort, which pgrx declares opaque: the matched pg_hba
 * line's OAuth options and the client's address. Each returns NULL when there is no port or
 * no hba line (never during a normal OAuth login).
 */
#include "postgres.h"
#include "libpq/hba.h"
#include "libpq/libpq-be.h"
#include "miscadmin.h"

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
