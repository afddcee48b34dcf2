//! Test fixture: tar archives built member by member.

/// One tar member: path, kind, mode, data, link target.
pub type Member<'a> = (&'a str, tar::EntryType, u32, &'a [u8], Option<&'a str>);

/// A tar of `members` (GNU headers, mtime 2024-01-01), every member
/// owned by `owner` (uid and gid).
pub fn tar_of(members: &[Member<'_>], owner: u64) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, mode, data, link) in members {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(*mode);
        h.set_mtime(1_704_067_200);
        h.set_uid(owner);
        h.set_gid(owner);
        h.set_size(data.len() as u64);
        match link {
            Some(l) => b.append_link(&mut h, path, l).unwrap(),
            None => b.append_data(&mut h, path, *data).unwrap(),
        }
    }
    b.into_inner().unwrap()
}
