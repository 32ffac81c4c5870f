//! Guest OS collectors (`kata_guest_*`), read from /proc at scrape time.
