/*
 * Keeps this library's code in memory that every backend inherits (issue 19).
 *
 * PostgreSQL forks a backend for every connection. Linux does not copy a file mapping's page
 * table entries at fork (a page fault fills them in when needed), so each new backend faults in
 * every 64 KiB of this library's code and constants that its login runs, and unmaps them again
 * at exit: most of what a token login cost beyond its signature check. Called in the postmaster
 * while it loads shared_preload_libraries (one thread, before any client), this copies each
 * read-only mapping of the library into anonymous memory at the same address, with the same
 * protection, in 2 MiB pages where a mapping covers whole ones. Fork copies anonymous mappings'
 * entries, so a backend runs the code without faulting it in.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#define MAX_RANGES 16
#define HUGE_SIZE ((uintptr_t) 2 << 20)

struct range
{
	uintptr_t	start;
	uintptr_t	end;
	int			prot;
};

const char *gprxy_keep_code_resident(size_t *bytes, size_t *huge_bytes);

/* One line of /proc/self/maps: its range, permissions and path (empty for anonymous memory). */
static int
parse_line(char *line, unsigned long *start, unsigned long *end, char perms[5], char **path)
{
	int			path_at = 0;

	if (sscanf(line, "%lx-%lx %4s %*s %*s %*s %n", start, end, perms, &path_at) < 3 || path_at == 0)
		return 0;
	*path = line + path_at;
	(*path)[strcspn(*path, "\n")] = '\0';
	return 1;
}

/*
 * The library's mappings that are readable and not writable (code, constants, headers), found
 * by the path of the mapping this function runs from (as the kernel names it: symbolic links
 * in the path PostgreSQL loaded resolved).
 */
static const char *
find_ranges(struct range *ranges, int *count)
{
	const uintptr_t self = (uintptr_t) gprxy_keep_code_resident;
	FILE	   *maps;
	char		line[4096];
	char		library[4096] = "";
	unsigned long start,
				end;
	char		perms[5];
	char	   *path;

	*count = 0;
	maps = fopen("/proc/self/maps", "r");
	if (maps == NULL)
		return "/proc/self/maps cannot be read";
	while (library[0] == '\0' && fgets(line, sizeof line, maps) != NULL)
		if (parse_line(line, &start, &end, perms, &path) && start <= self && self < end && path[0] == '/')
			snprintf(library, sizeof library, "%s", path);
	if (library[0] == '\0')
	{
		fclose(maps);
		return "the library's code was not found in /proc/self/maps";
	}
	rewind(maps);
	while (fgets(line, sizeof line, maps) != NULL)
	{
		if (!parse_line(line, &start, &end, perms, &path) || strcmp(path, library) != 0)
			continue;
		if (perms[0] != 'r' || perms[1] == 'w')
			continue;
		if (*count == MAX_RANGES)
		{
			fclose(maps);
			return "the library has more mappings than expected";
		}
		ranges[*count].start = start;
		ranges[*count].end = end;
		ranges[*count].prot = PROT_READ | (perms[2] == 'x' ? PROT_EXEC : 0);
		(*count)++;
	}
	fclose(maps);
	return NULL;
}

/*
 * Replaces one mapping by an anonymous copy at the same address. The copy is made at an
 * address congruent to the original modulo 2 MiB, so that its 2 MiB pages land on 2 MiB
 * boundaries when mremap moves it into place; mremap replaces the file mapping atomically, and
 * the bytes at every address stay the same throughout.
 */
static const char *
copy_range(const struct range *r, size_t *huge_bytes)
{
	size_t		len = r->end - r->start;
	size_t		span = len + HUGE_SIZE;
	char	   *raw = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uintptr_t	base,
				copy,
				first_huge,
				end_huge;

	if (raw == MAP_FAILED)
		return "mmap of the copy failed";
	base = (uintptr_t) raw;
	copy = (base & ~(HUGE_SIZE - 1)) + (r->start & (HUGE_SIZE - 1));
	if (copy < base)
		copy += HUGE_SIZE;
	if (copy > base)
		munmap(raw, copy - base);
	if (base + span > copy + len)
		munmap((void *) (copy + len), base + span - (copy + len));
	/* Best effort: without transparent huge pages the copy is in 4 KiB pages. */
	(void) madvise((void *) copy, len, MADV_HUGEPAGE);
	memcpy((void *) copy, (const void *) r->start, len);
	if (mprotect((void *) copy, len, r->prot) != 0)
	{
		munmap((void *) copy, len);
		return "mprotect of the copy failed";
	}
	if (mremap((void *) copy, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, (void *) r->start) == MAP_FAILED)
	{
		munmap((void *) copy, len);
		return "mremap onto the library failed";
	}
	first_huge = (r->start + HUGE_SIZE - 1) & ~(HUGE_SIZE - 1);
	end_huge = r->end & ~(HUGE_SIZE - 1);
	if (end_huge > first_huge)
		*huge_bytes += end_huge - first_huge;
	return NULL;
}

/*
 * Copies the library's read-only mappings into anonymous memory. Returns NULL when done (with
 * the bytes copied, and those eligible for 2 MiB pages), else what failed: the mappings not yet
 * copied stay as they were, and either way the code at every address is the same.
 */
const char *
gprxy_keep_code_resident(size_t *bytes, size_t *huge_bytes)
{
	struct range ranges[MAX_RANGES];
	int			count;
	const char *failed = find_ranges(ranges, &count);

	*bytes = 0;
	*huge_bytes = 0;
	if (failed)
		return failed;
	for (int i = 0; i < count; i++)
	{
		failed = copy_range(&ranges[i], huge_bytes);
		if (failed)
			return failed;
		*bytes += ranges[i].end - ranges[i].start;
	}
	return NULL;
}
